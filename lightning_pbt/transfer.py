"""Moving a member's full training state from a winner to a loser, in memory.

A state is any nest of dicts, lists and tuples with tensors at the leaves (model ``state_dict``,
optimizer and LR-scheduler states, the precision plugin's state). It travels as:

1. a *skeleton*: the nest with every tensor replaced by a small marker (dtype, shape), serialised
   with ``torch.save`` and read back with ``torch.load(weights_only=True)`` so that nothing but plain
   data can be unpickled;
2. the tensors themselves, in few large messages: tensors of at least ``direct_bytes`` go as they are
   (no copy), smaller ones are packed per dtype into buckets of at most ``bucket_bytes``. Per-message
   overhead is what makes hundreds of small sends slow; copying large tensors is what makes one flat
   buffer slow, so each tensor takes the cheaper of the two.

The skeleton's byte length travels in the ready step's all-gather, so a loser can post every receive
of a step at once.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FlatState",
    "flatten_state",
    "message_layout",
    "pack_messages",
    "unflatten_state",
    "unpack_messages",
]

_MARKER = "__lightning_pbt_tensor__"
DIRECT_BYTES = 1 << 20
BUCKET_BYTES = 32 << 20


@dataclass
class FlatState:
    """A state split into its tensors and a serialised skeleton that describes everything else."""

    tensors: list[Tensor]
    skeleton: bytes

    @property
    def skeleton_tensor(self) -> Tensor:
        return (
            torch.frombuffer(bytearray(self.skeleton), dtype=torch.uint8)
            if self.skeleton
            else torch.empty(0, dtype=torch.uint8)
        )


def flatten_state(state: Any) -> FlatState:
    tensors: list[Tensor] = []

    def strip(node: Any) -> Any:
        if isinstance(node, Tensor):
            tensors.append(node.detach())
            return {
                _MARKER: len(tensors) - 1,
                "dtype": str(node.dtype).removeprefix("torch."),
                "shape": list(node.shape),
                "device": node.device.type,
            }
        if isinstance(node, dict):  # any mapping type travels as a plain dict
            return {key: strip(value) for key, value in node.items()}
        if isinstance(node, list):
            return [strip(value) for value in node]
        if isinstance(node, tuple):
            return tuple(strip(value) for value in node)
        return node

    skeleton = strip(state)
    buffer = io.BytesIO()
    torch.save(skeleton, buffer)
    return FlatState(tensors, buffer.getvalue())


def _markers(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        if _MARKER in node:
            yield node
            return
        for value in node.values():
            yield from _markers(value)
    elif isinstance(node, list | tuple):
        for value in node:
            yield from _markers(value)


def read_skeleton(skeleton: bytes) -> tuple[Any, list[dict]]:
    """The skeleton and its tensor markers in index order; only plain data can be unpickled."""
    nest = torch.load(io.BytesIO(skeleton), weights_only=True)
    markers = sorted(_markers(nest), key=lambda marker: marker[_MARKER])
    if [marker[_MARKER] for marker in markers] != list(range(len(markers))):
        raise ValueError("lightning_pbt: a received state skeleton is corrupt (tensor indices do not match)")
    return nest, markers


def unflatten_state(nest: Any, tensors: Sequence[Tensor]) -> Any:
    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            if _MARKER in node:
                return tensors[node[_MARKER]]
            return {key: fill(value) for key, value in node.items()}
        if isinstance(node, list):
            return [fill(value) for value in node]
        if isinstance(node, tuple):
            return tuple(fill(value) for value in node)
        return node

    return fill(nest)


def message_layout(
    specs: Sequence[tuple[torch.dtype, int]],
    direct_bytes: int = DIRECT_BYTES,
    bucket_bytes: int = BUCKET_BYTES,
) -> list[list[int]]:
    """Group tensor indices into messages from ``(dtype, numel)`` alone, so both sides agree.

    Large tensors get a message each; small ones share per-dtype buckets, in index order.
    """
    messages: list[list[int]] = []
    open_buckets: dict[torch.dtype, tuple[list[int], int]] = {}
    for index, (dtype, numel) in enumerate(specs):
        size = numel * dtype.itemsize
        if size >= direct_bytes:
            messages.append([index])
            continue
        bucket, used = open_buckets.get(dtype, ([], 0))
        if bucket and used + size > bucket_bytes:
            messages.append(bucket)
            bucket, used = [], 0
        bucket.append(index)
        open_buckets[dtype] = (bucket, used + size)
    messages.extend(bucket for bucket, _ in open_buckets.values() if bucket)
    return messages


def pack_messages(
    tensors: Sequence[Tensor], layout: Sequence[Sequence[int]], device: torch.device
) -> list[Tensor]:
    """The buffers to send: large tensors as flat views (no copy), small ones concatenated."""
    messages = []
    for indices in layout:
        parts = [tensors[i].to(device).contiguous().reshape(-1) for i in indices]
        messages.append(parts[0] if len(parts) == 1 else torch.cat(parts))
    return messages


def allocate_messages(
    markers: Sequence[dict], layout: Sequence[Sequence[int]], device: torch.device
) -> list[Tensor]:
    buffers = []
    for indices in layout:
        dtype = _dtype(markers[indices[0]]["dtype"])
        numel = sum(_numel(markers[i]["shape"]) for i in indices)
        buffers.append(torch.empty(numel, dtype=dtype, device=device))
    return buffers


def unpack_messages(
    buffers: Sequence[Tensor], markers: Sequence[dict], layout: Sequence[Sequence[int]], target: torch.device
) -> list[Tensor]:
    """Received buffers back to tensors (views into the buffers), on ``target`` or the CPU as sent."""
    tensors: list[Tensor | None] = [None] * len(markers)
    for buffer, indices in zip(buffers, layout, strict=True):
        offset = 0
        for i in indices:
            numel = _numel(markers[i]["shape"])
            device = torch.device("cpu") if markers[i]["device"] == "cpu" else target
            tensors[i] = buffer[offset : offset + numel].view(markers[i]["shape"]).to(device)
            offset += numel
    return tensors  # type: ignore[return-value]


def specs_of(markers: Sequence[dict]) -> list[tuple[torch.dtype, int]]:
    return [(_dtype(marker["dtype"]), _numel(marker["shape"])) for marker in markers]


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"lightning_pbt: a received state names an unknown dtype {name!r}")
    return dtype


def _numel(shape: Sequence[int]) -> int:
    numel = 1
    for dim in shape:
        numel *= int(dim)
    return numel
