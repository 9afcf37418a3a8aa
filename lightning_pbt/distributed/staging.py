"""Host memory for staging GPU tensors through a host transport (gloo between members that share a GPU,
or a population without NCCL): whether a tensor is staged, and the page-locked buffers it goes through,
reused between transfers so that staging memory is bounded by the largest one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["STAGING", "StagingPool", "stages", "staging_buffer"]


def stages(source: torch.device, transport: torch.device) -> bool:
    """Whether a tensor on ``source`` goes through host staging buffers for a transport on ``transport``
    (GPU tensors over a gloo population): the one backend-dependent choice of the transfer code."""
    return source.type == "cuda" and transport.type == "cpu"


class StagingPool:
    """Page-locked host memory for staging GPU tensors through a host transport; one per role and process.

    :meth:`take` hands out views into one byte buffer, valid until the next :meth:`take`: a round's
    staging is over by then (its sends and receives were waited for, its copies synchronised). The buffer
    grows to the largest round and is then reused, so staging memory is bounded by the largest transfer
    instead of growing with every message (torch's pinned allocator keeps what it once allocated).
    Used from the training thread only.
    """

    ALIGN = 64

    def __init__(self) -> None:
        self._buffer: Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    def take(self, specs: Sequence[tuple[int, torch.dtype]]) -> list[Tensor]:
        """One buffer per ``(numel, dtype)``, carved out of the pool (grown first when it is too small)."""
        offsets, total = [], 0
        for numel, dtype in specs:
            offsets.append(total)
            total += -(-numel * dtype.itemsize // self.ALIGN) * self.ALIGN
        if total > self.capacity:
            self._buffer = None  # released before the larger one is allocated
            self._buffer = torch.empty(total, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        buffer = self._buffer
        assert buffer is not None or not specs
        return [
            buffer[offset : offset + numel * dtype.itemsize].view(dtype)  # type: ignore[index]
            for offset, (numel, dtype) in zip(offsets, specs, strict=True)
        ]


STAGING = {"send": StagingPool(), "receive": StagingPool()}


def staging_buffer(numel: int, dtype: torch.dtype, device: torch.device, pinned: bool) -> Tensor:
    """A transport buffer; page-locked host memory when it stages GPU tensors for a host transport (gloo),
    so that the copies to and from the GPU are direct DMA."""
    return torch.empty(numel, dtype=dtype, device=device, pin_memory=pinned and device.type == "cpu")
