"""What an agent tells the coordinator about its device."""

from __future__ import annotations

import os
import platform
import socket

import torch

from ..messages import NodeFacts


def accelerator_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple silicon ({platform.machine()}, MPS)"
    return platform.processor() or platform.machine()


def memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def device_facts(device: torch.device, *, labels: dict[str, str], num_samples: int
                 ) -> NodeFacts:
    return NodeFacts(
        device=device.type,
        platform=platform.platform(terse=True),
        machine=platform.machine(),
        cpus=os.cpu_count() or 0,
        memory_bytes=memory_bytes(),
        accelerator=accelerator_name(device),
        labels=labels,
        num_samples=num_samples,
        hostname=socket.gethostname(),
    )
