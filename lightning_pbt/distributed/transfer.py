"""Moving a member's full training state from a winner to a loser, in memory.

A state is any nest of dicts, lists and tuples with tensors at the leaves (model ``state_dict``,
optimizer and LR-scheduler states, the precision plugin's state). It travels as:

1. a *skeleton*: the nest with every tensor replaced by a small marker (index, dtype, shape), as
   tagged JSON. JSON keeps what pickle would lose safely (int dict keys, tuples, inf) through tags,
   parses in microseconds, and cannot carry code: a received state is plain data by construction;
2. the tensors themselves, in few large messages: tensors of at least ``direct_bytes`` go as they are
   (no copy), smaller ones are packed per dtype into buckets of at most ``bucket_bytes``. Per-message
   overhead is what makes hundreds of small sends slow; copying large tensors is what makes one flat
   buffer slow, so each tensor takes the cheaper of the two.

A transfer is a fixed-size header (skeleton length, spec fingerprint, status: a refusal sends nothing
more), then the skeleton and the messages, in the same order on both sides: only the members that move
state pay for flattening it. NCCL pairs messages by their order, gloo by tag; the tags follow the order
(see ``PopulationGroup.exchange``), so both pair them alike; every message travels as bytes, whatever its
dtype. When the donor's fingerprint equals the loser's, the loser receives straight into its own tensors;
what reached the model's parameters and buffers that way needs no further copy, anything else
(:func:`outside_module`) is loaded with ``load_state_dict``.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_pbt.distributed.staging import STAGING, stages, staging_buffer

__all__ = [
    "FlatState",
    "PackedState",
    "Received",
    "bytes_tensor",
    "fits",
    "flatten_state",
    "message_layout",
    "outside_module",
    "pack_messages",
    "pack_state",
    "read_skeleton",
    "receive_state",
    "send_state",
    "spec_hash",
    "unflatten_state",
    "unpack_messages",
]

# Tags of the JSON skeleton; plain JSON values stand for themselves.
_TENSOR, _DICT, _TUPLE, _FLOAT = "$tensor", "$dict", "$tuple", "$float"
DIRECT_BYTES = 64 << 10
BUCKET_BYTES = 32 << 20
_HEADER = 3


@dataclass
class FlatState:
    """A state split into its tensors and a serialised skeleton that describes everything else.

    Attributes:
        tensors: the state's tensors, in flatten order (detached, not copied).
        skeleton: tagged JSON of the nest with a marker (index, dtype, shape) for each tensor.
    """

    tensors: list[Tensor]
    skeleton: bytes

    @property
    def skeleton_tensor(self) -> Tensor:
        return bytes_tensor(self.skeleton)


def bytes_tensor(data: bytes) -> Tensor:
    """``data`` as a uint8 tensor (a copy), ready to send."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def flatten_state(state: Any) -> FlatState:
    tensors: list[Tensor] = []

    def encode(node: Any) -> Any:
        if isinstance(node, Tensor):
            tensors.append(node.detach())
            marker = {"index": len(tensors) - 1, "dtype": str(node.dtype).removeprefix("torch.")}
            return {_TENSOR: marker, "shape": list(node.shape), "device": node.device.type}
        if isinstance(node, dict):  # any mapping type travels as a plain dict
            if all(isinstance(key, str) and not key.startswith("$") for key in node):
                return {key: encode(value) for key, value in node.items()}
            return {_DICT: [[encode(key), encode(value)] for key, value in node.items()]}
        if isinstance(node, list):
            return [encode(value) for value in node]
        if isinstance(node, tuple):
            return {_TUPLE: [encode(value) for value in node]}
        if isinstance(node, float) and not math.isfinite(node):
            return {_FLOAT: repr(node)}
        if node is None or isinstance(node, bool | int | float | str):
            return node
        raise TypeError(
            f"lightning_pbt cannot transfer a {type(node).__name__} inside a training state; state dicts "
            "may hold tensors, numbers, strings, None, and dicts, lists or tuples of them"
        )

    skeleton = encode(state)
    return FlatState(tensors, json.dumps(skeleton, separators=(",", ":"), allow_nan=False).encode())


def _markers(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        if _TENSOR in node:
            yield node
            return
        for value in node.values():
            yield from _markers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _markers(value)


def read_skeleton(skeleton: bytes) -> tuple[Any, list[dict]]:
    """The skeleton and its tensor markers in index order; JSON, so only plain data can arrive."""
    try:
        nest = json.loads(skeleton.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"lightning_pbt: a received state skeleton is not valid JSON: {error}") from None
    markers = sorted(_markers(nest), key=lambda marker: marker[_TENSOR]["index"])
    if [marker[_TENSOR]["index"] for marker in markers] != list(range(len(markers))):
        raise ValueError("lightning_pbt: a received state skeleton is corrupt (tensor indices do not match)")
    for marker in markers:
        marker["dtype"] = marker[_TENSOR]["dtype"]
    return nest, markers


def unflatten_state(nest: Any, tensors: Sequence[Tensor]) -> Any:
    def decode(node: Any) -> Any:
        if isinstance(node, dict):
            if _TENSOR in node:
                return tensors[node[_TENSOR]["index"]]
            if _DICT in node:
                return {_hashable(decode(key)): decode(value) for key, value in node[_DICT]}
            if _TUPLE in node:
                return tuple(decode(value) for value in node[_TUPLE])
            if _FLOAT in node:
                return float(node[_FLOAT])
            return {key: decode(value) for key, value in node.items()}
        if isinstance(node, list):
            return [decode(value) for value in node]
        return node

    return decode(nest)


def _hashable(key: Any) -> Any:
    return tuple(_hashable(part) for part in key) if isinstance(key, list | tuple) else key


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
    tensors: Sequence[Tensor],
    layout: Sequence[Sequence[int]],
    device: torch.device,
    copy: bool = False,
    out: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """The buffers to send on ``device``: a large tensor already there as a flat view (no copy), anything
    else copied into one buffer per message.

    GPU tensors bound for host memory (a gloo population) are staged in this process's page-locked send
    pool (:class:`~lightning_pbt.distributed.staging.StagingPool`) with non-blocking copies and one
    synchronisation; ``copy=True`` (a snapshot that must outlive the round) gets buffers of its own
    instead. ``out``: buffers of an earlier packing of the same layout (:func:`fits`), written again
    instead of allocating new ones.
    """
    buffers: list[Tensor | None] = []
    for indices in layout:
        first = tensors[indices[0]]
        direct = not copy and len(indices) == 1 and first.device == device and first.is_contiguous()
        buffers.append(first.detach().reshape(-1) if direct else None)
    pending = [k for k, buffer in enumerate(buffers) if buffer is None]
    specs = {k: (sum(tensors[i].numel() for i in layout[k]), tensors[layout[k][0]].dtype) for k in pending}
    if out is not None:
        for k in pending:
            buffers[k] = out[k]
    else:
        staged = [k for k in pending if not copy and stages(tensors[layout[k][0]].device, device)]
        for k, buffer in zip(staged, STAGING["send"].take([specs[k] for k in staged]), strict=True):
            buffers[k] = buffer
        for k in pending:
            if buffers[k] is None:
                buffers[k] = staging_buffer(*specs[k], device, pinned=tensors[layout[k][0]].device.type == "cuda")
    from_gpu = False
    for k in pending:
        offset, buffer = 0, buffers[k]
        assert buffer is not None
        for i in layout[k]:
            source = tensors[i].detach().reshape(-1)
            buffer[offset : offset + source.numel()].copy_(source, non_blocking=source.is_cuda)
            from_gpu |= source.is_cuda
            offset += source.numel()
    if from_gpu:  # one synchronisation for every device-to-host copy of the round
        torch.cuda.synchronize()
    return buffers  # type: ignore[return-value]


def fits(buffers: Sequence[Tensor], tensors: Sequence[Tensor], layout: Sequence[Sequence[int]]) -> bool:
    """Whether ``buffers`` have exactly the dtypes and sizes that packing ``tensors`` in ``layout`` needs."""
    return len(buffers) == len(layout) and all(
        buffer.dtype == tensors[indices[0]].dtype and buffer.numel() == sum(tensors[i].numel() for i in indices)
        for buffer, indices in zip(buffers, layout, strict=False)
    )


def allocate_messages(
    markers: Sequence[dict], layout: Sequence[Sequence[int]], device: torch.device, pinned: bool = False
) -> list[Tensor]:
    """Receive buffers for ``layout``; ``pinned``: staging for tensors bound for a GPU, from this process's
    receive pool (valid until its next use: :func:`unpack_messages` copies everything out of it)."""
    specs = [
        (sum(_numel(markers[i]["shape"]) for i in indices), _dtype(markers[indices[0]]["dtype"])) for indices in layout
    ]
    if pinned and device.type == "cpu":
        return STAGING["receive"].take(specs)
    return [staging_buffer(numel, dtype, device, pinned=False) for numel, dtype in specs]


def unpack_messages(
    buffers: Sequence[Tensor],
    markers: Sequence[dict],
    layout: Sequence[Sequence[int]],
    target: torch.device,
    pooled: bool = False,
) -> list[Tensor]:
    """Received buffers back to tensors, on ``target`` or the CPU as sent: views into the buffers, or, when
    they are ``pooled`` staging buffers, copies (non-blocking to the GPU, one synchronisation)."""
    tensors: list[Tensor | None] = [None] * len(markers)
    to_gpu = False
    for buffer, indices in zip(buffers, layout, strict=True):
        offset = 0
        for i in indices:
            numel = _numel(markers[i]["shape"])
            device = torch.device("cpu") if markers[i]["device"] == "cpu" else target
            view = buffer[offset : offset + numel].view(markers[i]["shape"])
            if not pooled:
                tensors[i] = view.to(device)
            elif device.type == "cpu":
                tensors[i] = view.clone()  # the pool is reused by the next transfer
            else:
                tensors[i] = view.to(device, non_blocking=True)
                to_gpu |= device.type == "cuda"
            offset += numel
    if to_gpu:
        torch.cuda.synchronize()
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


def spec_hash(tensors: Sequence[Tensor]) -> int:
    """A 32-bit fingerprint of the tensors' dtypes and shapes, equal on every process for equal specs.

    Exchanged in the ready step's all-gather: when a donor's fingerprint equals the loser's, both
    sides know the message layout in advance, so the loser receives straight into its own tensors
    in one round trip.
    """
    text = ";".join(f"{str(t.dtype).removeprefix('torch.')}{tuple(t.shape)}" for t in tensors)
    return zlib.crc32(text.encode())


@dataclass
class PackedState:
    """A state ready to send: its skeleton, spec fingerprint and message buffers.

    Packed once per transfer and sent to every loser of that donor; in asynchronous mode the snapshot a
    member serves is a ``PackedState`` in host memory.

    Attributes:
        skeleton: the state's skeleton (see :class:`FlatState`).
        spec_hash: the tensors' fingerprint (:func:`spec_hash`).
        messages: the buffers to send, in order (:func:`message_layout`).
    """

    skeleton: bytes
    spec_hash: int
    messages: list[Tensor]

    @property
    def nbytes(self) -> int:
        return len(self.skeleton) + sum(m.numel() * m.element_size() for m in self.messages)


def pack_state(
    flat: FlatState, device: torch.device, copy: bool = False, reuse: PackedState | None = None
) -> PackedState:
    """Lay ``flat`` out in messages on ``device`` (the transport's device: host memory for gloo).

    ``copy=True`` makes a snapshot that later training cannot change; otherwise large tensors already
    on ``device`` are sent as they are. ``reuse``: an earlier snapshot nobody reads any more; when its
    buffers fit, it is overwritten and returned (no new allocation), else a new one is made.
    """
    layout = message_layout(_specs(flat.tensors))
    if copy and reuse is not None and fits(reuse.messages, flat.tensors, layout):
        pack_messages(flat.tensors, layout, device, copy=True, out=reuse.messages)
        reuse.skeleton, reuse.spec_hash = flat.skeleton, spec_hash(flat.tensors)
        return reuse
    return PackedState(flat.skeleton, spec_hash(flat.tensors), pack_messages(flat.tensors, layout, device, copy))


def outside_module(module: torch.nn.Module, model_state: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``model_state`` that are not ``module``'s own parameters or buffers (by storage).

    An in-place receive writes into the tensors ``state_dict()`` returned; only those that are the module's
    parameters and buffers thereby reach the module. The rest (copies made by a ``state_dict`` hook, extra
    state) must still go through ``load_state_dict``.
    """
    live = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    return {
        key: value
        for key, value in model_state.items()
        if not (isinstance(value, Tensor) and value.untyped_storage().data_ptr() in live)
    }


def header_tensor(device: torch.device) -> Tensor:
    """The first message of every transfer: ``[skeleton bytes, spec hash, status]`` (status < 0: refused)."""
    return torch.zeros(_HEADER, dtype=torch.int64, device=device)


def send_state(population: Any, packed: PackedState, peers: Sequence[int], status: int = 0) -> None:
    """Send ``packed`` to every peer: a fixed-size header, then the skeleton and the messages.

    Both sides follow the same message order, so it works where messages are matched by order (NCCL)
    as well as by tag (gloo); the loser posts its receives after reading the header.
    """
    device = population.device
    header = header_tensor(device)
    header[0], header[1], header[2] = len(packed.skeleton), packed.spec_hash, status
    population.exchange([(peer, [header]) for peer in peers], [])
    if status < 0:
        return
    skeleton = bytes_tensor(packed.skeleton).to(device)
    population.exchange([(peer, [skeleton, *packed.messages]) for peer in peers], [])


def _receive_header(population: Any, peer: int) -> tuple[Tensor, int] | None:
    """The header of a transfer from ``peer``: an empty buffer for its skeleton and its spec fingerprint,
    or ``None`` when it refused (negative status: nothing follows)."""
    header = header_tensor(population.device)
    population.exchange([], [(peer, [header])])
    skeleton_bytes, remote_hash, status = (int(v) for v in header.cpu().tolist())
    if status < 0:
        return None
    return torch.empty(skeleton_bytes, dtype=torch.uint8, device=population.device), remote_hash


def receive_state(population: Any, peer: int, own: Sequence[Tensor] | None, target: torch.device) -> Received | None:
    """Receive what :func:`send_state` sends; ``None`` when the sender refused (negative status).

    When the sender's spec fingerprint equals that of ``own`` (the loser's tensors, in flatten order),
    the layout is known in advance: large tensors arrive straight in the loser's own tensors and the
    rest is copied in, so a model keeps its parameter objects (``in_place``). Otherwise fresh tensors
    are allocated from the skeleton.
    """
    device = population.device
    heard = _receive_header(population, peer)
    if heard is None:
        return None
    skeleton, remote_hash = heard
    in_place = own is not None and remote_hash == spec_hash(own)
    if in_place:
        assert own is not None
        layout = message_layout(_specs(own))
        inbox = _receive_targets(own, layout, device)
        population.exchange([], [(peer, [skeleton, *inbox])])
        nest, _ = read_skeleton(bytes(skeleton.cpu().numpy()))
        return Received(nest, _settle_in_place(own, inbox, layout), in_place=True)
    population.exchange([], [(peer, [skeleton])])
    nest, markers = read_skeleton(bytes(skeleton.cpu().numpy()))
    layout = message_layout(specs_of(markers))
    pooled = stages(target, device)
    inbox = allocate_messages(markers, layout, device, pinned=pooled)
    population.exchange([], [(peer, inbox)], first_tag=1)  # the messages follow the skeleton (tag 0)
    return Received(nest, unpack_messages(inbox, markers, layout, target, pooled), in_place=False)


@dataclass
class Received:
    """What a loser got: the donor's skeleton, the tensors in its order, and whether they were
    written straight into the loser's own tensors (then the model needs no further copy).

    Attributes:
        nest: the parsed skeleton.
        tensors: the received tensors, in the donor's flatten order.
        in_place: whether they are the loser's own tensors, overwritten.
    """

    nest: Any
    tensors: list[Tensor]
    in_place: bool


def _specs(tensors: Sequence[Tensor]) -> list[tuple[torch.dtype, int]]:
    return [(t.dtype, t.numel()) for t in tensors]


def _receive_targets(tensors: Sequence[Tensor], layout: Sequence[Sequence[int]], device: torch.device) -> list[Tensor]:
    """A large tensor is received into itself when it can be; buckets into fresh buffers, or into the
    receive pool when they stage GPU tensors."""
    targets: list[Tensor | None] = []
    for indices in layout:
        own = tensors[indices[0]]
        direct = len(indices) == 1 and own.is_contiguous() and own.device == device
        targets.append(own.view(-1) if direct else None)
    pending = [k for k, target in enumerate(targets) if target is None]
    specs = {k: (sum(tensors[i].numel() for i in layout[k]), tensors[layout[k][0]].dtype) for k in pending}
    staged = [k for k in pending if stages(tensors[layout[k][0]].device, device)]
    for k, buffer in zip(staged, STAGING["receive"].take([specs[k] for k in staged]), strict=True):
        targets[k] = buffer
    for k in pending:
        if targets[k] is None:
            targets[k] = staging_buffer(*specs[k], device, pinned=False)
    return targets  # type: ignore[return-value]


def _settle_in_place(
    tensors: Sequence[Tensor], inbox: Sequence[Tensor], layout: Sequence[Sequence[int]]
) -> list[Tensor]:
    """Copy what arrived in buffers into the loser's own tensors (non-blocking to a GPU, one
    synchronisation); return them (now the donor's values)."""
    to_gpu = False
    for buffer, indices in zip(inbox, layout, strict=True):
        if len(indices) == 1 and buffer.data_ptr() == tensors[indices[0]].data_ptr():
            continue
        offset = 0
        for i in indices:
            tensors[i].copy_(buffer[offset : offset + tensors[i].numel()].view_as(tensors[i]), non_blocking=True)
            to_gpu |= tensors[i].is_cuda
            offset += tensors[i].numel()
    if to_gpu:
        torch.cuda.synchronize()
    return list(tensors)
