"""Keep large freed buffers mapped, so each 4 MiB message reuses memory instead of
faulting in fresh pages.

protobuf's upb encoder grows its output buffer by doubling in a fresh arena block and
then copies the result out: serialising one 4 MiB chunk touches about 16 MB of new
memory. With glibc's defaults, blocks that large come from mmap and go back to the kernel
when freed, so every message pays ~4,000 page faults: 25-50 ms for a 4 MiB chunk on this
project's VMs (0.1-0.2 GB/s) against 1.3 ms once the memory is kept (measured with
`getrusage`; bench/wire.py shows the effect on a whole transfer). Raising glibc's mmap and
trim thresholds keeps such blocks in the heap for reuse. The cost is that up to
`TRIM_BYTES` of freed heap stays resident instead of returning to the kernel.

Applied at process start by the `fedkube` entry points; a no-op off glibc and wherever
the user already set MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ (glibc's own
environment tunables, which then win).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations below this come from the heap: glibc's own ceiling for its dynamic
#: threshold (32 MiB on 64-bit), well above a chunk and its encoder's buffers.
MMAP_BYTES = 32 << 20
#: Freed memory at the top of the heap kept for reuse: a few chunks' worth of buffers
#: at each stage of a transfer.
TRIM_BYTES = 128 << 20
_USER_TUNABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_large_buffers_mapped(env: Mapping[str, str] = os.environ) -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if it did."""
    if not sys.platform.startswith("linux") or any(env.get(name) for name in _USER_TUNABLES):
        return False
    try:  # the C library already loaded into this process, without ldconfig's help
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a C library without mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES))
