"""An asynchronous copy's receive: into a host pool of the receiving rank's own, reused from copy to copy,
touching none of the loser's tensors until every rank of its member has the copy (:meth:`Staged.settle`).

The wire format and every helper are :mod:`lightning_pbt.distributed.transfer`'s; this is its second way
to receive, kept apart so that each module stays short.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_pbt.distributed.staging import StagingPool
from lightning_pbt.distributed.transfer import (
    Received,
    _dtype,
    _numel,
    _receive_header,
    _settle_in_place,
    _specs,
    message_layout,
    read_skeleton,
    spec_hash,
    specs_of,
    unpack_messages,
)

__all__ = ["Staged", "receive_staged"]


def receive_staged(
    population: Any, peer: int, own: Sequence[Tensor] | None, target: torch.device, pool: StagingPool
) -> Staged | None:
    """Receive what :func:`~lightning_pbt.distributed.transfer.send_state` sends into ``pool`` (host memory,
    the receiving rank's own), touching nothing of the loser's yet; ``None`` when the sender refused.
    :meth:`Staged.settle` then writes it into ``own`` (when the sender's fingerprint equals ``own``'s, as
    :func:`~lightning_pbt.distributed.transfer.receive_state` does) or unpacks fresh tensors.

    The asynchronous mode receives this way: the ranks of a member load a copy only if every one of them
    got it (a donor's rank may refuse a snapshot it has replaced), so nothing may land in a rank's own
    tensors before they agree; and the pool is reused from copy to copy, so an exploit allocates no
    state-sized buffer (fresh receive buffers on every copy fragmented the heap: resident memory grew with
    the run) and a GPU member never holds a second copy of its state.
    """
    device = population.device
    if device.type != "cpu":
        raise ValueError(
            f"lightning_pbt: receive_staged needs a host transport (its pool is host memory), not {device}"
        )
    heard = _receive_header(population, peer)
    if heard is None:
        return None
    skeleton, remote_hash = heard
    if own is not None and remote_hash == spec_hash(own):
        layout = message_layout(_specs(own))
        inbox = pool.take([(sum(own[i].numel() for i in indices), own[indices[0]].dtype) for indices in layout])
        population.exchange([], [(peer, [skeleton, *inbox])])
        nest, markers = read_skeleton(bytes(skeleton.cpu().numpy()))
        return Staged(nest, markers, layout, inbox, list(own), target)
    population.exchange([], [(peer, [skeleton])])
    nest, markers = read_skeleton(bytes(skeleton.cpu().numpy()))
    layout = message_layout(specs_of(markers))
    inbox = pool.take(
        [
            (sum(_numel(markers[i]["shape"]) for i in indices), _dtype(markers[indices[0]]["dtype"]))
            for indices in layout
        ]
    )
    population.exchange([], [(peer, inbox)], first_tag=1)  # the messages follow the skeleton (tag 0)
    return Staged(nest, markers, layout, inbox, None, target)


@dataclass
class Staged:
    """A received state still in its pool (:func:`receive_staged`); valid until the pool's next use.

    Attributes:
        nest: the parsed skeleton.
        markers: its tensor markers, in index order.
        layout: the message layout the buffers follow.
        inbox: the buffers, in the receive pool.
        own: the loser's tensors it settles into (equal fingerprints), or ``None`` (fresh tensors).
        target: where the loser's tensors live.
    """

    nest: Any
    markers: list[dict]
    layout: list[list[int]]
    inbox: list[Tensor]
    own: list[Tensor] | None
    target: torch.device

    def settle(self) -> Received:
        """Write the state into the loser's own tensors, or unpack it into fresh ones (off the pool)."""
        if self.own is not None:
            return Received(self.nest, _settle_in_place(self.own, self.inbox, self.layout), in_place=True)
        tensors = unpack_messages(self.inbox, self.markers, self.layout, self.target, pooled=True)
        return Received(self.nest, tensors, in_place=False)
