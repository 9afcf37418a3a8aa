"""A prototype of a faster exploit transfer, measured next to the real one by ``bench/transfer.py``.

Not used by the package: it shows what a change to ``lightning_pbt/transfer.py`` and
``PopulationBasedTraining._transfer_states`` would gain. The profile of the real path (``profiles`` in
bench/results/transfer.json) shows where its time goes beyond the raw send/recv:

1. a fixed ~3-4 ms per exploit, whatever the size: ``flatten_state`` pickles the skeleton with
   ``torch.save`` (~0.5 ms, on every rank at every ready step), the skeleton then travels in a round
   trip of its own before the tensors (0.2-2.5 ms depending on load), and the loser parses it with
   ``torch.load(weights_only=True)`` (~1.2-1.5 ms) and rebuilds the nest (``unpack``, ~0.3-0.4 ms);
2. tensors below ``DIRECT_BYTES`` (1 MiB) are copied into buckets by the sender (``torch.cat``:
   ~1.2-1.6 ms for the 10 MB state, whose largest tensor is 0.9 MB, so it all goes bucketed);
3. the loser receives into freshly allocated buffers and ``load_state_dict`` then copies every model
   tensor out of them (~0.5 ms at 10 MB, 4.5-7 ms at 100 MB); the optimizer state keeps pointing into
   the received buffers (a new allocation each exploit).

The prototype keeps the message layout and the exchange, and changes only this:

- a 48-bit hash of the state's tensor specs (dtype, shape) would travel in the ready step's row; when
  the donor's hash equals the loser's (same model and optimizer: the normal case), the loser
  receives every large tensor *in place* into its own parameter / optimizer-state tensors (no
  allocation, no copy), and buckets into a buffer it keeps between ready steps;
- the skeleton goes in the same exchange as the tensors (one round trip instead of two);
- the skeleton is tagged JSON (dict keys keep their int/str type, tuples stay tuples), not a pickle;
- ``load_state_dict`` then finds each tensor already in place (``copy_`` of a tensor onto itself
  returns at once), so it only restores the non-tensor parts (param groups, scheduler state).

When the hashes differ (another architecture, or an optimizer without state yet) it falls back to the
current path.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_pbt import transfer

_MARKER = "__lightning_pbt_tensor__"
DIRECT_BYTES = 64 << 10


class PlainSkeletonError(TypeError):
    pass


def _encode(node: Any, tensors: list[Tensor]) -> Any:
    if isinstance(node, Tensor):
        tensors.append(node.detach())
        return {"t": len(tensors) - 1}
    if isinstance(node, Mapping):
        return {"d": [[_encode(k, tensors), _encode(v, tensors)] for k, v in node.items()]}
    if isinstance(node, list):
        return {"l": [_encode(v, tensors) for v in node]}
    if isinstance(node, tuple):
        return {"u": [_encode(v, tensors) for v in node]}
    if node is None or isinstance(node, bool | int | float | str):
        return node
    raise PlainSkeletonError(type(node).__name__)


def _decode(node: Any, tensors: Sequence[Tensor]) -> Any:
    if isinstance(node, dict):
        if "t" in node:
            return tensors[node["t"]]
        if "d" in node:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in node["d"]}
        if "l" in node:
            return [_decode(v, tensors) for v in node["l"]]
        return tuple(_decode(v, tensors) for v in node["u"])
    return node


class FastFlat:
    """Tensors, the JSON skeleton, and the 48-bit hash of the tensor specs."""

    def __init__(self, state: Any) -> None:
        self.tensors: list[Tensor] = []
        self.skeleton = json.dumps(_encode(state, self.tensors), separators=(",", ":")).encode()
        specs = ";".join(f"{t.dtype}{tuple(t.shape)}" for t in self.tensors).encode()
        self.spec_hash = float(int.from_bytes(hashlib.blake2b(specs, digest_size=6).digest(), "little"))

    @property
    def skeleton_tensor(self) -> Tensor:
        return torch.frombuffer(bytearray(self.skeleton), dtype=torch.uint8)


class InPlaceReceiver:
    """Keeps the bucket buffers between ready steps; receives large tensors into the live state."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[torch.dtype, int, int], Tensor] = {}

    def buffers(self, tensors: Sequence[Tensor], layout: Sequence[Sequence[int]]) -> list[Tensor]:
        out = []
        for position, indices in enumerate(layout):
            first = tensors[indices[0]]
            if len(indices) == 1 and first.is_contiguous():
                out.append(first.view(-1))  # in place: the live parameter / optimizer-state tensor
                continue
            numel = sum(tensors[i].numel() for i in indices)
            key = (first.dtype, numel, position)
            if key not in self._buckets:
                self._buckets[key] = torch.empty(numel, dtype=first.dtype)
            out.append(self._buckets[key])
        return out

    @staticmethod
    def scatter(buffers: Sequence[Tensor], tensors: Sequence[Tensor], layout: Sequence[Sequence[int]]) -> None:
        for buffer, indices in zip(buffers, layout, strict=True):
            target = tensors[indices[0]]
            if len(indices) == 1 and buffer.data_ptr() == target.data_ptr():
                continue
            offset = 0
            for i in indices:
                n = tensors[i].numel()
                tensors[i].copy_(buffer[offset: offset + n].view_as(tensors[i]))
                offset += n


def transfer_states(trainer: Any, plans: Mapping[int, Any], hashes: Sequence[float], skeleton_sizes: Sequence[int],
                    flat: FastFlat, topology: Any, population: Any, receiver: InPlaceReceiver,
                    load_state: Any) -> None:
    """The prototype of ``_transfer_states``: one exchange, in-place receive when the specs match."""
    j = topology.member_rank
    exploits = [(member, plan.parent) for member, plan in sorted(plans.items()) if plan.event == "exploit"]
    send_to = [topology.world_rank_of(loser, j) for loser, donor in exploits if donor == topology.member_id]
    receive_from = next(
        (topology.world_rank_of(donor, j) for loser, donor in exploits if loser == topology.member_id), None)
    if not send_to and receive_from is None:
        return
    own_rank = topology.world_rank
    for peer in [*send_to, *([receive_from] if receive_from is not None else [])]:
        if hashes[peer] != hashes[own_rank]:
            raise NotImplementedError("prototype: the fallback is the current transfer path")
    layout = transfer.message_layout([(t.dtype, t.numel()) for t in flat.tensors], direct_bytes=DIRECT_BYTES)
    outgoing = [flat.skeleton_tensor, *transfer.pack_messages(flat.tensors, layout, population.device)] \
        if send_to else []
    incoming: list[Tensor] = []
    if receive_from is not None:
        skeleton_in = torch.empty(int(skeleton_sizes[receive_from]), dtype=torch.uint8)
        incoming = [skeleton_in, *receiver.buffers(flat.tensors, layout)]
    population.exchange([(peer, outgoing) for peer in send_to],
                        [(receive_from, incoming)] if receive_from is not None else [])
    if receive_from is not None:
        receiver.scatter(incoming[1:], flat.tensors, layout)
        nest = json.loads(bytes(incoming[0].numpy()).decode())
        load_state(trainer, _decode(nest, flat.tensors))
