"""How many threads torch may use in each fedkube process.

torch's default is one thread per physical core of the host, whatever else runs there.
When the coordinator's fold, its gRPC event loop and the agents share those cores, the
OpenMP workers of one process spin waiting for cores the others hold, and a FedAvg of 50
updates went from 6 s with one thread to 67 s with two on a busy two-core machine. So
each process takes a share that leaves room for the others:

- `coordinator` (its own pod or machine): every usable core but one, which stays free for
  the event loop that receives and checks uploads while a fold runs; at least one.
- `local` (`fedkube run`: the coordinator beside its simulated agents, one process per
  core, each agent on one thread): one.
- `agent` (a device that trains): every usable core; training is its only work.

"Usable" counts the cores this process may be scheduled on and the container's CPU quota
(cgroup v1 or v2), since a pod limited to 2 CPUs on a 64-core node must not start 64
threads; torch's own default (physical cores) stays the ceiling, so hyper-threads are not
counted twice. `FEDKUBE_TORCH_THREADS=N` overrides the choice for any role.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

Role = Literal["coordinator", "local", "agent"]
ENV_VAR = "FEDKUBE_TORCH_THREADS"
_CGROUP = Path("/sys/fs/cgroup")


class ThreadsError(ValueError):
    """FEDKUBE_TORCH_THREADS holds something other than a positive integer."""


def cpu_quota(cgroup: Path = _CGROUP) -> float | None:
    """CPUs the container's quota allows (e.g. 2.5), or None when it sets none."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]  # cgroup v2
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def usable_cpus(cgroup: Path = _CGROUP) -> int:
    """Cores this process may run on, capped by the container's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity call
        cores = os.cpu_count() or 1
    quota = cpu_quota(cgroup)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def choose_torch_threads(role: Role, *, cpus: int, env: Mapping[str, str],
                         ceiling: int | None = None) -> int:
    """The thread count for `role` with `cpus` usable cores, at most `ceiling` (torch's
    default) unless the environment says otherwise (module doc)."""
    override = env.get(ENV_VAR, "").strip()
    if override:
        try:
            threads = int(override)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ThreadsError(f"{ENV_VAR}={override!r}: expected a positive integer")
        return threads
    if role == "local":
        share = 1
    elif role == "coordinator":
        share = cpus - 1
    elif role == "agent":
        share = cpus
    else:
        raise ThreadsError(f"unknown role {role!r}: expected coordinator, local or agent")
    return max(1, min(share, ceiling) if ceiling is not None else share)


def apply_torch_threads(role: Role) -> int:
    """Set torch's intra-op thread count for this process; returns the count set."""
    import torch

    threads = choose_torch_threads(role, cpus=usable_cpus(), env=os.environ,
                                   ceiling=torch.get_num_threads())
    torch.set_num_threads(threads)
    return threads
