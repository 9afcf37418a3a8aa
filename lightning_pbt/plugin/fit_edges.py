"""What the callback does at the two edges of a fit: how members start, and what they end with.

Start: whether members start from identical weights (a digest of each member's weights, compared over
the population group; every rank takes part), and ``initial_weights="per_member"``, which re-initialises
each member's weights from its own seed. End: whether a ready step is a member's last (no training follows
it, so it keeps the values it trained with), and the results every rank learns when fit ends.

The decisions are pure functions (:func:`identical_groups`, :func:`identical_start_message`,
:func:`training_ends_here`); the rest is thin glue around the population group.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_pbt.algorithm.results import MemberResult, PopulationResults, results_from_gathered
from lightning_pbt.algorithm.topology import PopulationTopology
from lightning_pbt.distributed.collectives import PopulationGroup
from lightning_pbt.plugin.apply import reset_weights

__all__ = [
    "checkpoint_of",
    "finish_results",
    "gather_results",
    "gather_weight_digests",
    "identical_groups",
    "identical_start_message",
    "identical_start_warning",
    "log_hyperparameters",
    "member_result",
    "reinitialize_member",
    "save_if_best",
    "training_ends_here",
    "weights_digest",
]

def weights_digest(module: torch.nn.Module) -> int:
    """A 48-bit digest of the module's parameters and buffers (exact in a float64, for a gather)."""
    digest = hashlib.blake2b(digest_size=6)
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        if isinstance(tensor, torch.Tensor) and tensor.numel():
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest(), "little")


def gather_weight_digests(population: PopulationGroup, topology: PopulationTopology, digest: int) -> dict[int, int]:
    """``{member: digest}`` of the members in this view's lane (all of them with one member per process):
    every rank of the population must call it, in its lane's turn (one all-gather)."""
    table = population.all_gather(torch.tensor([float(digest)], dtype=torch.float64, device=population.device)).cpu()
    lane = [m for m in range(topology.num_members) if topology.lane_of(m) == topology.lane]
    return {m: int(table[topology.world_rank_of(m, 0), 0]) for m in lane}


def identical_groups(digests: Mapping[int, int]) -> list[list[int]]:
    """Members that share their weights, as groups of two or more (sorted).

    Examples:
        >>> identical_groups({0: 7, 1: 7, 2: 5, 3: 7})
        [[0, 1, 3]]
        >>> identical_groups({0: 1, 1: 2})
        []
    """
    by_digest: dict[int, list[int]] = {}
    for member, digest in sorted(digests.items()):
        by_digest.setdefault(digest, []).append(member)
    return sorted(group for group in by_digest.values() if len(group) > 1)


def _members(group: Sequence[int]) -> str:
    names = [str(m) for m in group]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def identical_start_message(groups: Sequence[Sequence[int]], num_members: int, initial_weights: str) -> str:
    """The warning for members that start alike, with the fix.

    Args:
        groups: the members that share their weights (:func:`identical_groups`).
        num_members: the population's size.
        initial_weights: the callback's ``initial_weights`` (``"per_member"`` has another fix).

    Examples:
        >>> identical_start_message([[0, 1, 2, 3]], 4, "as_built").split(",")[0]
        'PopulationBasedTraining: all 4 members start from identical weights'
    """
    if len(groups) == 1 and len(groups[0]) == num_members:
        who = f"all {num_members} members start from identical weights"
    else:
        who = "; ".join(f"members {_members(group)} start from identical weights" for group in groups)
    if initial_weights == "per_member":
        return (
            f"PopulationBasedTraining: {who} although initial_weights='per_member' re-initialised them: none of "
            "their modules has reset_parameters(); build the layers in configure_model instead (the strategy seeds "
            "member i with seed_everything's seed + i just before it)"
        )
    return (
        f"PopulationBasedTraining: {who}, so the population starts as one point in weight space and only the "
        "hyperparameters differ (the model was built before Trainer.fit with the same seed in every process). To "
        "start each member from weights of its own, build the layers in the LightningModule's configure_model hook "
        "(the strategy seeds member i with seed_everything's seed + i just before it), or pass "
        "PopulationBasedTraining(initial_weights='per_member') to re-initialise each member's weights from that "
        "seed when fit starts. If identical starts are what you want (fine-tuning one pretrained model), pass "
        "initial_weights='shared'."
    )


def identical_start_warning(
    population: PopulationGroup,
    topology: PopulationTopology,
    module: torch.nn.Module,
    warn: bool,
    initial_weights: str,
    seen: dict[int, int] | None = None,
) -> str | None:
    """The warning for members that start alike (``None``: they differ, not every member's digest is known
    yet, or ``warn`` is false). Every rank of the population must call it (one all-gather); only a rank
    with ``warn`` (population rank 0, on a fresh start) gets the message, so that it is said once.

    With members that take turns each lane calls it in its turn and gathers its own lane's members;
    ``seen`` (shared by the process's lanes) collects them, and the lane that completes it decides.
    """
    seen = {} if seen is None else seen
    seen.update(gather_weight_digests(population, topology, weights_digest(module)))
    if not warn or len(seen) < topology.num_members:
        return None
    groups = identical_groups(seen)
    return identical_start_message(groups, topology.num_members, initial_weights) if groups else None


def reinitialize_member(module: torch.nn.Module, optimizers: Sequence[Any], member_seed: int) -> int:
    """Fresh weights for this member from its own seed (the same on every rank of the member), with every
    submodule's ``reset_parameters`` and no optimizer state; returns how many submodules were reset."""
    return reset_weights(module, optimizers, seed=member_seed)


def training_ends_here(
    global_step: int,
    max_steps: int | None,
    epochs_done: int,
    max_epochs: int | None,
    should_stop: bool,
    min_steps: int | None = None,
    min_epochs: int | None = None,
) -> bool:
    """Whether no training follows this validation end: ``max_steps`` or ``max_epochs`` is reached, or the
    trainer stops (and its minimums are met). Unknowable stops (``max_time``) are not foreseen.

    Examples:
        >>> training_ends_here(100, 100, 3, None, False), training_ends_here(96, 100, 3, 4, False)
        (True, False)
        >>> training_ends_here(96, -1, 4, 4, False), training_ends_here(50, -1, 2, 10, True, min_epochs=5)
        (True, False)
    """
    if max_steps is not None and max_steps >= 0 and global_step >= max_steps:
        return True
    if max_epochs is not None and max_epochs >= 0 and epochs_done >= max_epochs:
        return True
    return bool(should_stop) and global_step >= (min_steps or 0) and epochs_done >= (min_epochs or 0)


def gather_results(
    population: PopulationGroup, mine: Sequence[Mapping[str, Any]], monitor: str, mode: str, run_dir: str | None
) -> PopulationResults:
    """Every member's result on every rank from ``mine``, the results of the members this process hosts
    (one all-gather of JSON; every rank must call it, once)."""
    gathered = population.all_gather_json([dict(result) for result in mine])
    return results_from_gathered([r for hosted in gathered for r in hosted], monitor, mode, run_dir)  # type: ignore


def checkpoint_of(trainer: Any) -> tuple[str | None, float | None]:
    """This member's checkpoint to load: its (first) ModelCheckpoint's best one, else its last; and the score
    that ModelCheckpoint gave it, when it monitors one."""
    callback = getattr(trainer, "checkpoint_callback", None)
    if callback is None:
        return None, None
    path = getattr(callback, "best_model_path", "") or getattr(callback, "last_model_path", "") or None
    score = getattr(callback, "best_model_score", None) if path and path == callback.best_model_path else None
    return path, None if score is None else float(score)


def member_result(trainer: Any, member: int, book: Any) -> dict[str, Any]:
    """What one member ended with (its score, step, values, parent and checkpoint), as JSON-able facts."""
    status = book.population[member]
    path, checkpoint_score = checkpoint_of(trainer)
    return {
        "member": member,
        "score": status.get("score"),
        "step": max(book.last_ready_step, 0),
        "hyperparameters": dict(book.hyperparameters),
        "parent": status.get("parent", member),
        "copied_from": status.get("copied_from"),
        "checkpoint_path": path,
        "checkpoint_score": checkpoint_score,
    }


def finish_results(
    population: PopulationGroup,
    hosted: Sequence[tuple[Any, int, Any]],
    monitor: str,
    mode: str,
    run_dir: str | None,
    folder: str,
) -> tuple[PopulationResults, str | None]:
    """Every member's result, the same on every rank (every rank must call it once, after every member
    it hosts stopped and the population finished), and where the best member's state must be saved
    (``<folder>/member_<id>.ckpt``; ``None``: it has a checkpoint of its own): the best member's ranks
    save it (:func:`save_if_best`).

    Args:
        hosted: ``(trainer, member, book)`` of every member this process hosts (one, or K that take turns).
    """
    results = gather_results(population, [member_result(*entry) for entry in hosted], monitor, mode, run_dir)
    best = results.best
    if best is None or best.checkpoint_path is not None:
        return results, None
    saved = os.path.join(folder, f"member_{best.member}.ckpt")  # the same decision and path on every rank
    members = [MemberResult(**{**vars(r), "checkpoint_path": saved}) if r is best else r for r in results.members]
    return PopulationResults(members, results.monitor, results.mode, results.run_dir), saved


def save_if_best(trainer: Any, member: int, results: PopulationResults, saved: str | None) -> None:
    """The best member's ranks save its state where :func:`finish_results` said (``trainer.save_checkpoint``:
    a collective of that member's ranks only; with members that take turns, in that member's own turn)."""
    if saved is not None and results.best is not None and results.best.member == member:
        trainer.save_checkpoint(saved)


def log_hyperparameters(loggers: Sequence[Any], values: Mapping[str, Any]) -> str | None:
    """Give every logger the member's values in effect (``hparams.yaml`` follows them); a problem as text."""
    problem = None
    for logger in loggers:
        try:
            logger.log_hyperparams(dict(values))
        except Exception as error:  # e.g. MLflow refuses to change a logged param
            problem = f"{type(logger).__name__} could not record the member's new hyperparameters: {error}"
    return problem
