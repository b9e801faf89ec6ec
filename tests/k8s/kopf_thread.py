"""Run a kopf operator in-process, in its own thread and event loop, for the length of a test.

kopf logs in through the login handlers of its registry. The default registry falls back to
``kopf.login_via_client``, which reads ``$KUBECONFIG``: set it to ``kube_api.kubeconfig``
(``monkeypatch.setenv``). A registry of the test's own needs a handler, for example::

    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(login_to(kube_api))
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Collection
from typing import Any, Self

import kopf

from .apiserver import KubeApi


def login_to(api: KubeApi) -> Callable[..., kopf.ConnectionInfo]:
    """A ``@kopf.on.login`` handler for the test API server."""
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=api.url, insecure=True, default_namespace="default")

    return login


def quick_settings() -> kopf.OperatorSettings:
    """Settings for tests: no peering, and retries and reconnections in fractions of a second."""
    settings = kopf.OperatorSettings()
    settings.peering.standalone = True
    settings.watching.reconnect_backoff = 0.1
    settings.networking.error_backoffs = [0.1, 0.2, 0.5]
    settings.queueing.idle_timeout = 0.2
    settings.queueing.exit_timeout = 1.0
    return settings


class OperatorThread:
    """``kopf.operator(...)`` in a thread. ``start()`` waits until kopf reports ready;
    ``stop()`` asks it to exit and waits; a crash is re-raised by ``stop()``."""

    def __init__(
        self,
        *,
        registry: kopf.OperatorRegistry | None = None,
        settings: kopf.OperatorSettings | None = None,
        namespaces: Collection[str] = ("default",),
        clusterwide: bool = False,
        memo: Any = None,
    ) -> None:
        self.registry = registry
        self.settings = settings if settings is not None else quick_settings()
        self.namespaces = list(namespaces)
        self.clusterwide = clusterwide
        self.memo = memo
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 20.0) -> Self:
        self._thread = threading.Thread(target=self._run, name="kopf-operator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"the kopf operator was not ready in {timeout}s: {self.failure!r}")
        return self

    def stop(self, timeout: float = 20.0) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        alive = self._thread.is_alive()
        self._thread = None
        if alive:
            raise RuntimeError(f"the kopf operator did not stop in {timeout}s")
        if self.failure is not None:
            raise RuntimeError("the kopf operator crashed") from self.failure

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(kopf.operator(
                registry=self.registry, settings=self.settings, standalone=True,
                clusterwide=self.clusterwide,
                namespaces=[] if self.clusterwide else self.namespaces,
                stop_flag=self._stop, ready_flag=self._ready, memo=self.memo))
        except BaseException as exc:  # noqa: BLE001 -- re-raised by stop()
            self.failure = exc
            self._ready.set()
