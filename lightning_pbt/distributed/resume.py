"""The resume agreement: ranks that must be in step resume from checkpoints of the same PBT ready step.

Those are all ranks of a synchronous run, and the ranks of each member in an asynchronous one (whose
members are at steps of their own). A crash can land between two saves of one ready step, so each rank
reports the ready step of the checkpoint it was given; ranks ahead of the slowest of their set fall back
to an older checkpoint of theirs (keep several, e.g. ``ModelCheckpoint(save_top_k=-1)``). Every rank
sees the same gathered table and takes the same decision (:func:`resume_target`, pure), so every rank
raises the same error when that is impossible.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_pbt.algorithm.topology import PopulationTopology
from lightning_pbt.distributed.collectives import PopulationGroup

__all__ = [
    "FIT_CKPT_INDEX",
    "FIT_WEIGHTS_ONLY_INDEX",
    "NO_CHECKPOINT",
    "UNREADABLE",
    "agree_on_resume",
    "agree_on_resume_of_lanes",
    "checkpoint_at_ready_step",
    "fit_checkpoint",
    "pbt_state",
    "resume_target",
]

log = logging.getLogger(__name__)

# Trainer._fit_impl(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, weights_only)
FIT_CKPT_INDEX = 4
FIT_WEIGHTS_ONLY_INDEX = 5
NO_CHECKPOINT = -2  # a rank's entry in the table: it was given no checkpoint
UNREADABLE = -3  # its checkpoint cannot be read


def fit_checkpoint(trainer: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any], str | None, Any]:
    """The checkpoint a ``Trainer._fit_impl(*args, **kwargs)`` call resumes from, ``"last"`` resolved.

    ``ckpt_path="last"`` is resolved against this member's own (already scoped) folders, before any
    process group exists, and written back into the call's arguments.

    Args:
        trainer: the Trainer whose ``_fit_impl`` is about to run.
        args: its positional arguments.
        kwargs: its keyword arguments.

    Returns:
        ``(args, kwargs, ckpt_path, weights_only)``: the call's arguments with ``"last"`` resolved, the
        checkpoint path as a string (``None``: a fresh start) and the call's ``weights_only``.
    """
    positional = len(args) > FIT_CKPT_INDEX
    ckpt_path = args[FIT_CKPT_INDEX] if positional else kwargs.get("ckpt_path")
    if ckpt_path == "last":
        connector = trainer._checkpoint_connector
        ckpt_path = connector._parse_ckpt_path(trainer.state.fn, "last", True, False)
        if positional:
            args = (*args[:FIT_CKPT_INDEX], ckpt_path, *args[FIT_CKPT_INDEX + 1 :])
        else:
            kwargs["ckpt_path"] = ckpt_path
    weights_only = args[FIT_WEIGHTS_ONLY_INDEX] if len(args) > FIT_WEIGHTS_ONLY_INDEX else None
    return args, kwargs, (str(ckpt_path) if ckpt_path is not None else None), kwargs.get("weights_only", weights_only)


def pbt_state(path: str, weights_only: bool | None = None) -> dict[str, Any]:
    """The PBT callback's state in a checkpoint (empty when it holds none).

    Args:
        path: the checkpoint file.
        weights_only: plain data only unless ``False`` (``trainer.fit(..., weights_only=False)``).
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only is not False, mmap=True)
    for key, state in checkpoint.get("callbacks", {}).items():
        if str(key).startswith("PopulationBasedTraining") and isinstance(state, dict):
            return state
    return {}


def checkpoint_at_ready_step(directory: str, step: int) -> str | None:
    """A checkpoint in ``directory`` taken after ready step ``step``, the newest one first.

    Args:
        directory: the folder to search (``*.ckpt``; unreadable files are skipped).
        step: the ready step (``last_ready_step`` of the PBT state).
    """
    candidates = sorted(
        (os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(".ckpt")),
        key=os.path.getmtime,
        reverse=True,
    )
    for path in candidates:
        try:
            if int(pbt_state(path).get("last_ready_step", -1)) == step:
                return path
        except Exception:  # an unreadable file is simply not a candidate
            log.debug("skipping unreadable checkpoint %s", path, exc_info=True)
    return None


def resume_target(
    rows: Sequence[Sequence[int]],
    in_step_if_asynchronous: Sequence[int],
    describe: Callable[[list[int]], str] = lambda rows: f"world ranks {rows}",
) -> int | None:
    """The ready step this rank must resume from, decided from the gathered table alone.

    Args:
        rows: per world rank (per world rank and lane when members take turns), ``[ready step of its
            checkpoint, synchronous]``; the step is ``NO_CHECKPOINT`` or ``UNREADABLE`` where it has none.
        in_step_if_asynchronous: the rows that must be in step with this one when any checkpoint comes
            from an asynchronous run (this member's).
        describe: names a list of rows in an error message.

    Returns:
        ``None`` when no rank resumes; else the slowest ready step of the rows that must be in step.

    Raises:
        RuntimeError: some ranks cannot read their checkpoint, or some resume and others do not.

    Examples:
        >>> resume_target([[8, 1], [4, 1]], [0])  # synchronous: everyone at the slowest
        4
        >>> resume_target([[8, 0], [4, 0], [6, 0], [6, 0]], [0, 1])  # asynchronous: this member only
        4
    """
    table = [step for step, _ in rows]
    if all(step == NO_CHECKPOINT for step in table):
        return None
    unreadable = [rank for rank, step in enumerate(table) if step == UNREADABLE]
    if unreadable:
        raise RuntimeError(
            f"PopulationStrategy: {describe(unreadable)} cannot read the checkpoint they were given to "
            "resume from (corrupt or not a Lightning checkpoint); see their log"
        )
    if any(step == NO_CHECKPOINT for step in table):
        missing = [rank for rank, step in enumerate(table) if step == NO_CHECKPOINT]
        raise RuntimeError(
            f"PopulationStrategy: {describe(missing)} have no checkpoint to resume from while the others "
            "do; resume every member (e.g. ckpt_path='last' with ModelCheckpoint(save_last=True)) or none"
        )
    in_step = range(len(table)) if all(flag for _, flag in rows) else in_step_if_asynchronous
    return min(table[rank] for rank in in_step)


def _own_row(path: str | None, weights_only: bool | None) -> list[int]:
    """This rank's ``[ready step, synchronous]`` for the table."""
    if not path:
        return [NO_CHECKPOINT, 1]
    try:
        state = pbt_state(path, weights_only)
        return [int(state.get("last_ready_step", -1)), int(bool(state.get("synchronous", True)))]
    except Exception as error:  # reported through the gather, so that every rank raises
        log.error("cannot read the checkpoint %s: %s", path, error)
        return [UNREADABLE, 1]


def agree_on_resume(
    population: PopulationGroup, topology: PopulationTopology, path: str | None, weights_only: bool | None
) -> str | None:
    """Agree with the population on the ready step to resume from; every rank must call it.

    Args:
        population: the population group (two all-gathers, on every rank, whatever it resumes from).
        topology: this rank's place in the population.
        path: the checkpoint this rank was given (``None``: a fresh start).
        weights_only: the fit's ``weights_only`` (how ``path`` may be read).

    Returns:
        The older checkpoint this rank must load instead of ``path`` (``None``: ``path`` itself).

    Raises:
        RuntimeError: on every rank: see :func:`resume_target`, or ranks that must roll back keep no
            checkpoint of the agreed step.
    """
    return agree_on_resume_of_lanes(population, topology, [(path, weights_only)])[0]


def agree_on_resume_of_lanes(
    population: PopulationGroup, topology: PopulationTopology, checkpoints: Sequence[tuple[str | None, bool | None]]
) -> list[str | None]:
    """:func:`agree_on_resume` for every member this process hosts at once (members that take turns).

    One agreement for the K lanes of a process, in the same two all-gathers (K rows each): a crash can
    fall between the saves of two members of one process as well as between processes, and lanes that
    agreed one by one would each see only the members of their own lane number.

    Args:
        population: the population group; every rank calls this once, with its K lanes.
        topology: this rank's place in the population (any lane).
        checkpoints: per lane, ``(path, weights_only)`` as :func:`agree_on_resume` takes them.

    Returns:
        Per lane, the older checkpoint to load instead of its ``path`` (``None``: ``path`` itself).
    """
    lanes = topology.members_per_process
    if len(checkpoints) != lanes:
        raise ValueError(f"agree_on_resume_of_lanes: {len(checkpoints)} checkpoints for {lanes} lanes")
    mine = [_own_row(path, weights_only) for path, weights_only in checkpoints]
    rows = population.all_gather(torch.tensor(mine, dtype=torch.int64)).reshape(-1, 2).cpu().tolist()

    def describe(indices: list[int]) -> str:  # row index = world rank x K + lane
        if lanes == 1:
            return f"world ranks {indices}"
        members = sorted({(i // lanes) // topology.member_size * lanes + i % lanes for i in indices})
        return f"members {members} (world ranks {sorted({i // lanes for i in indices})})"

    alternatives: list[str | None] = []
    found = []
    for lane, ((path, _), (step, _)) in enumerate(zip(checkpoints, mine, strict=True)):
        member = topology.slot * lanes + lane
        in_step = [rank * lanes + lane for rank in topology.member_ranks(member)]
        target = resume_target(rows, in_step, describe)
        alternative = None
        if target is not None and step != target:
            assert path is not None
            alternative = checkpoint_at_ready_step(os.path.dirname(os.path.abspath(path)), target)
            if alternative is not None:
                log.warning("member %d resumes from %s (ready step %d, as the others)", member, alternative, target)
        alternatives.append(alternative)
        found.append(int(target is None or step == target or alternative is not None))
    found_table = population.all_gather(torch.tensor(found)).flatten().tolist()
    if not all(found_table):
        stuck = [index for index, ok in enumerate(found_table) if not ok]
        raise RuntimeError(
            f"PopulationStrategy: ranks that must resume together resumed from different PBT ready steps (per "
            f"{'world rank' if lanes == 1 else 'world rank and lane'}: {[step for step, _ in rows]}) and "
            f"{describe(stuck)} keep no checkpoint of the step they must roll back to; keep several checkpoints "
            "(ModelCheckpoint(save_top_k=-1)) so that a restart can roll them back"
        )
    return alternatives
