"""Host values onto the device from the engine thread, without waiting for the GPU."""
from __future__ import annotations

import torch


def upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list (nested lists: a 2-D tensor) on the device without stalling the host: staged in pinned
    memory (torch's caching host allocator keeps the staging block until the copy has run), copied behind
    whatever the stream runs.
    A plain copy from pageable memory would block the engine thread, holding the GIL, until the GPU has
    finished the decode step in flight."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)

