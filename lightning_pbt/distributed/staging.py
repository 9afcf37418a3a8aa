"""Host memory for staging GPU tensors through a host transport (gloo between members that share a GPU,
or a population without NCCL): whether a tensor is staged, and the page-locked buffers it goes through,
reused between transfers so that staging memory is bounded by the largest one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["STAGING", "StagingPool", "block_bytes", "stages", "staging_buffer"]


def stages(source: torch.device, transport: torch.device) -> bool:
    """Whether a tensor on ``source`` goes through host staging buffers for a transport on ``transport``
    (GPU tensors over a gloo population): the one backend-dependent choice of the transfer code."""
    return source.type == "cuda" and transport.type == "cpu"


class StagingPool:
    """Page-locked host memory for staging GPU tensors through a host transport, or a copy's inbox.

    :meth:`take` hands out views into one byte buffer, valid until the next :meth:`take`: a round's
    staging is over by then (its sends and receives were waited for, its copies synchronised). The buffer
    grows to the largest round and is then reused, instead of growing with every message.

    Its size is always a power of two: torch's page-locked allocator rounds every block up to one and keeps
    every block it ever made (a freed one is reused only for a request that rounds to the same size), so
    the pool asks for exactly what the allocator reserves, and a round up to that size reuses it. What the
    process keeps for a pool is every block it outgrew as well (:attr:`held`): each at most half the next,
    so less than twice :attr:`capacity`, which is less than twice the largest round. Host memory that is
    not page-locked (no GPU) follows the same sizes, and the allocator returns outgrown blocks.
    Used from one thread only.
    """

    ALIGN = 64

    def __init__(self) -> None:
        self._buffer: Tensor | None = None
        self.held = 0  # bytes of every block this pool allocated (a page-locked cache keeps them all)

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
            size = block_bytes(total)
            self._buffer = None  # released before the larger one is allocated
            self._buffer = torch.empty(size, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
            self.held += size
        buffer = self._buffer
        assert buffer is not None or not specs
        return [
            buffer[offset : offset + numel * dtype.itemsize].view(dtype)  # type: ignore[index]
            for offset, (numel, dtype) in zip(offsets, specs, strict=True)
        ]


def block_bytes(nbytes: int) -> int:
    """The block torch's page-locked host allocator reserves for ``nbytes``: the next power of two.

    Examples:
        >>> block_bytes(4160), block_bytes(4096), block_bytes(1)
        (8192, 4096, 1)
    """
    return 1 << max(int(nbytes) - 1, 0).bit_length()


STAGING = {"send": StagingPool(), "receive": StagingPool()}


def staging_buffer(numel: int, dtype: torch.dtype, device: torch.device, pinned: bool) -> Tensor:
    """A transport buffer; page-locked host memory when it stages GPU tensors for a host transport (gloo),
    so that the copies to and from the GPU are direct DMA."""
    return torch.empty(numel, dtype=dtype, device=device, pin_memory=pinned and device.type == "cpu")
