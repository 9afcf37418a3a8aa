"""Ready steps: how members are scored, copy each other and explore, in lockstep or at their own pace.

Two implementations of one small interface (``base.ReadySteps``: ``start``, ``step``, ``finish``,
``close``), chosen by ``PopulationBasedTraining(synchronous=...)`` through :func:`protocol_class`:

- ``lockstep.SynchronousReadySteps`` (default, deterministic): every member reaches each ready step at
  the same global step; one all-gather of scores, population rank 0 decides for everyone, the decision
  is broadcast, donors send to losers. Every rank runs the same collectives whatever the outcome.
- ``asynchronous.AsynchronousReadySteps``: no member waits for another (but for a bounded
  ``wait_for_peers``). At its own ready step a member snapshots its state into host memory (served in
  the background, see :mod:`lightning_pbt.distributed.serving`), publishes its score in the launch's
  store, decides for itself from the latest published state of the population (lockstep's plan when it
  sees the population in step, see :mod:`lightning_pbt.algorithm.comparable`), and, to copy, fetches the
  donor's latest snapshot while the donor trains on.

Neither knows Lightning: the callback hands in a ``base.LocalMember`` (the trainer's state, how to load
it, apply hyperparameters, re-initialise weights) and one ``base.Observation`` per ready step.

The modules: ``base`` (what both share: the interface, the book, opening the lineage), ``lockstep``,
``asynchronous``, and ``records`` (an asynchronous member's published record and the pure questions
asked of the population's records).
"""

from __future__ import annotations

from lightning_pbt.distributed.ready_steps.asynchronous import AsynchronousReadySteps
from lightning_pbt.distributed.ready_steps.base import ReadySteps
from lightning_pbt.distributed.ready_steps.lockstep import SynchronousReadySteps

__all__ = ["protocol_class"]


def protocol_class(synchronous: bool) -> type[ReadySteps]:
    """The protocol for ``PopulationBasedTraining(synchronous=...)``.

    Args:
        synchronous: ``True``: :class:`SynchronousReadySteps`; ``False``: :class:`AsynchronousReadySteps`.
    """
    return SynchronousReadySteps if synchronous else AsynchronousReadySteps
