"""Member-scoped outputs: each member's loggers and checkpoints in ``member_<id>/`` of one run directory.

Lightning glue (it knows where loggers and checkpoint callbacks keep their folders); no collective. The
strategy scopes the outputs in every process before ``Trainer.fit`` resolves ``ckpt_path="last"`` (so
each member resumes from its own checkpoints), then moves them under the run directory that population
rank 0 chose (:func:`rebase_outputs`), so that differing working directories (e.g. Hydra's under
torchrun) cannot split a run.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ._lightning import ModelCheckpoint, OnExceptionCheckpoint

if TYPE_CHECKING:
    from lightning_pbt.distributed.collectives import PopulationGroup

__all__ = ["agree_on_run_dir", "member_dir", "rebase_outputs", "scope_outputs"]

_LOGGER_FOLDERS = ("_root_dir", "_save_dir")


def member_dir(member_id: int) -> str:
    """The folder name of a member's outputs, relative to the run directory.

    Args:
        member_id: the member.

    Examples:
        >>> member_dir(3)
        'member_3'
    """
    return f"member_{member_id}"


def _is_save_config_callback(callback: Any) -> bool:
    """LightningCLI's ``SaveConfigCallback`` (or a subclass), known by name: importing ``cli`` is costly."""
    return any(cls.__name__ == "SaveConfigCallback" for cls in type(callback).__mro__)


def scope_outputs(trainer: Any, member_id: int) -> str:
    """Point the trainer's loggers and checkpoint callbacks at ``member_<id>/`` folders.

    A logger that already writes somewhere stays (moving it would split its files). A checkpoint
    callback without a folder of its own and without a logger goes to
    ``<default_root_dir>/member_<id>/checkpoints``. Without a logger, LightningCLI's config file is
    written by member 0 only (every member parsed the same command line).

    Args:
        trainer: the Trainer, before fit starts.
        member_id: this process's member.

    Returns:
        The absolute ``default_root_dir`` the folders were scoped under.
    """
    root = os.path.abspath(trainer.default_root_dir)
    folder = member_dir(member_id)
    for logger in trainer.loggers:
        if getattr(logger, "_experiment", None) is not None:
            continue  # already writing somewhere; moving it now would split its files
        for attribute in _LOGGER_FOLDERS:
            value = getattr(logger, attribute, None)
            if isinstance(value, str | os.PathLike):
                setattr(logger, attribute, os.path.join(os.path.abspath(value), folder))
    for callback in trainer.callbacks:
        is_checkpoint = isinstance(callback, ModelCheckpoint | OnExceptionCheckpoint)
        if is_checkpoint and callback.dirpath is not None:
            callback.dirpath = os.path.join(os.path.abspath(callback.dirpath), folder)
        elif isinstance(callback, ModelCheckpoint) and not trainer.loggers:
            callback.dirpath = os.path.join(root, folder, "checkpoints")
        elif _is_save_config_callback(callback) and not trainer.loggers and member_id != 0:
            # Without a logger LightningCLI writes config.yaml into the run directory, which every
            # member shares; every member parsed the same command line, so member 0 writes it once.
            callback.save_to_log_dir = False
    return root


def rebase_outputs(trainer: Any, local_root: str, run_dir: str) -> None:
    """Move the folders under ``local_root`` to the same place under ``run_dir`` (the agreed run directory).

    Folders outside ``local_root`` (an explicit absolute path) and loggers already writing stay.

    Args:
        trainer: the Trainer whose outputs :func:`scope_outputs` scoped.
        local_root: this process's own ``default_root_dir`` (absolute).
        run_dir: the run directory every process agreed on.
    """
    if local_root == run_dir:
        return

    def rebase(path: str) -> str:
        path = os.path.abspath(path)
        inside = os.path.commonpath([path, local_root]) == local_root
        return os.path.join(run_dir, os.path.relpath(path, local_root)) if inside else path

    for logger in trainer.loggers:
        for attribute in _LOGGER_FOLDERS:
            value = getattr(logger, attribute, None)
            if isinstance(value, str) and getattr(logger, "_experiment", None) is None:
                setattr(logger, attribute, rebase(value))
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint | OnExceptionCheckpoint) and callback.dirpath is not None:
            callback.dirpath = rebase(callback.dirpath)


def agree_on_run_dir(trainer: Any, population: PopulationGroup, world_rank: int, local_root: str) -> str:
    """Population rank 0's ``default_root_dir`` becomes everyone's run directory; every rank must call it.

    Ranks whose working directory differs (e.g. Hydra under torchrun) move their member folders under
    it (:func:`rebase_outputs`), so that one run never splits across directories.

    Args:
        trainer: the Trainer; its ``default_root_dir`` becomes the run directory.
        population: the population group (one JSON broadcast from world rank 0).
        world_rank: this rank in the population.
        local_root: the root :func:`scope_outputs` scoped under in this process.

    Returns:
        The run directory.
    """
    run_dir = str(population.broadcast_json(local_root if world_rank == 0 else None, 0))
    trainer._default_root_dir = run_dir
    rebase_outputs(trainer, local_root, run_dir)
    return run_dir
