"""Kubernetes on this machine, for tests: an API server (kmock's emulator, extended), a
local kubelet that runs Pods as processes, and kopf in a thread.

Imported as ``k8s`` (tests/conftest.py puts tests/ on sys.path); the modules import each
other relatively, so ``tests.k8s`` works too where the repository root is on sys.path.
Fixtures over these live in tests/operator/conftest.py.
"""
