"""A finished run, read back without torch: where its lineage file is, a value of its Hydra config, and
whether its score was maximised. The report (``lightning_pbt.tools.report``) and ``PBTReplay``
(``lightning_pbt.plugin.replay``) both read a run this way, so it lives below both of them.

The lineage does not say whether the score is maximised; :func:`infer_mode` asks, in order: ``pbt.mode``
in the run's ``.hydra/config.yaml``, a ``mode`` in the init records' extras, the direction of the recorded
exploits (a winner copied by a loser), else ``max``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning_pbt.algorithm.lineage import LineageRecord

__all__ = ["donor_step", "find_lineage", "finite_number", "hyperparameter_names", "infer_mode", "run_config_value"]


def find_lineage(path: str | os.PathLike[str]) -> Path:
    """The lineage file for a run directory, its ``pbt/`` folder, or the file itself.

    Args:
        path: a run directory (with ``pbt/lineage.jsonl``), a ``pbt/`` folder, or a lineage file.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no ``lineage.jsonl``.
    """
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / "pbt" / "lineage.jsonl", path / "lineage.jsonl"):
        if candidate.is_file():
            return candidate
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    raise FileNotFoundError(f"no lineage.jsonl in {path} or {path / 'pbt'}")


def run_config_value(run_dir: str | os.PathLike[str] | None, key: str) -> tuple[Any, Path | None]:
    """``(value, config file)``: ``key`` from the run's ``.hydra/config.yaml`` (a Hydra app's run directory),
    ``None`` when the run has no such file or key (or the file cannot be read).

    Args:
        run_dir: the run directory (``None``: no run directory known).
        key: a dotted key, e.g. ``"pbt.mode"``.
    """
    if run_dir is None:
        return None, None
    config = Path(run_dir) / ".hydra" / "config.yaml"
    if not config.is_file():
        return None, None
    try:
        from omegaconf import OmegaConf

        return OmegaConf.select(OmegaConf.load(config), key, default=None), config
    except Exception:  # an unreadable config is no reason to fail a report
        return None, config


def infer_mode(records: Sequence[LineageRecord], run_dir: str | os.PathLike[str] | None = None) -> tuple[str, str]:
    """``(mode, where it came from)``; see the module docstring for the order (a ``--mode`` given to the
    report comes before all of them).

    Args:
        records: the run's lineage.
        run_dir: the run directory, whose ``.hydra/config.yaml`` may say ``pbt.mode``.

    Returns:
        ``("max" or "min", a phrase saying where it came from)``.
    """
    mode, config = run_config_value(run_dir, "pbt.mode")
    if mode in ("min", "max"):
        return mode, f"pbt.mode in {config}"
    for record in records:
        mode = record.extra.get("mode")
        if record.event == "init" and mode in ("min", "max"):
            return mode, "the lineage's init records"
    scores = {(r.step, r.member): r.score for r in records}
    votes = 0
    for record in records:
        if record.event != "exploit" or record.parent == record.member:
            continue
        mine, theirs = scores.get((record.step, record.member)), scores.get((donor_step(record), record.parent))
        if finite_number(mine) and finite_number(theirs) and mine != theirs:
            votes += 1 if theirs > mine else -1
    if votes:
        return ("max" if votes > 0 else "min"), "the direction of the recorded exploits"
    return "max", "default (pass --mode min if lower is better)"


def donor_step(record: LineageRecord) -> int:
    """The parent's step whose state an exploit copied (the same step, except in asynchronous runs).

    Args:
        record: an exploit's lineage record.
    """
    return record.step if record.donor_step is None else record.donor_step



def finite_number(value: Any) -> bool:
    """A real, finite number (not a bool, not a string that reads as one): what can be plotted or compared.

    Args:
        value: a score or hyperparameter value as the lineage holds it.
    """
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def hyperparameter_names(records: Iterable[LineageRecord]) -> list[str]:
    """Every hyperparameter a run's records name, in the order they first appear.

    Args:
        records: a run's lineage records.
    """
    names: list[str] = []
    for record in records:
        for name in record.hyperparameters:
            if name not in names:
                names.append(name)
    return names
