"""What a finished population gives its user: each member's result, the best member and its checkpoint.

At the end of fit every rank of the population knows the same facts (one all-gather, see
:meth:`PopulationBasedTraining.results`); population rank 0 prints :func:`summary_text` once and writes
them to ``results.json`` next to the lineage. Afterwards :func:`load_results`, :func:`best_checkpoint`
and :func:`load_best_model` read a finished run folder, as does the command line::

    python -m lightning_pbt best RUN_DIR          # the best member, its score, values and checkpoint

Keyed by member id throughout, never by rank. Reading needs neither torch nor Lightning;
:func:`load_best_model` imports the model class the caller passes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning_pbt.algorithm.exploit import is_finite_score, rank_members

__all__ = [
    "RESULTS_FILE",
    "RUN_OUTPUTS",
    "MemberResult",
    "PopulationResults",
    "best_checkpoint",
    "load_best_model",
    "load_results",
    "rank_results",
    "results_from_gathered",
    "set_aside_previous_run",
    "summary_text",
    "write_results",
]

RESULTS_FILE = "results.json"
# What a run writes next to its lineage (pbt/): a fresh run in the same folder moves them aside together.
RUN_OUTPUTS = (
    "lineage.jsonl",
    RESULTS_FILE,
    "summary.md",
    "schedule.json",
    "hyperparameters.png",
    "scores.png",
    "lineage_tree.png",
)


@dataclass(frozen=True)
class MemberResult:
    """One member at the end of fit.

    Attributes:
        member: the member's id.
        score: its monitored metric at its last ready step (``None``: unknown or not finite).
        step: the global step of that ready step.
        hyperparameters: the values it trained with last (no explore follows a member's last ready step).
        parent: the member whose weights it held after its last ready step (itself unless it copied there).
        checkpoint_path: where its weights can be loaded from: its ``ModelCheckpoint``'s best checkpoint
            (else its last), or, for the best member without one, the state PBT saved at the end
            (``None``: nothing saved for this member).
        checkpoint_score: the score its ``ModelCheckpoint`` gave that checkpoint, when it monitors one.
        copied_from: the member whose weights it copied last, at any ready step (``None``: it never copied).
    """

    member: int
    score: float | None
    step: int
    hyperparameters: dict[str, Any]
    parent: int
    checkpoint_path: str | None = None
    checkpoint_score: float | None = None
    copied_from: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemberResult:
        score, checkpoint_score = data.get("score"), data.get("checkpoint_score")
        return cls(
            member=int(data["member"]),
            score=float(score) if is_finite_score(score) else None,
            step=int(data["step"]),
            hyperparameters=dict(data["hyperparameters"]),
            parent=int(data.get("parent", data["member"])),
            checkpoint_path=data.get("checkpoint_path"),
            checkpoint_score=float(checkpoint_score) if is_finite_score(checkpoint_score) else None,
            copied_from=None if data.get("copied_from") is None else int(data["copied_from"]),
        )


@dataclass(frozen=True)
class PopulationResults:
    """The population at the end of fit, best member first.

    Attributes:
        members: one :class:`MemberResult` per member, best first (ties and unknown scores: lower id first).
        monitor: the metric that scored them.
        mode: ``"max"`` or ``"min"``.
        run_dir: the run directory (``None`` when unknown).
    """

    members: list[MemberResult]
    monitor: str
    mode: str
    run_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> MemberResult | None:
        """The best member's result (``None`` when no member has a finite score)."""
        return self.members[0] if self.members and self.members[0].score is not None else None

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "run_dir": self.run_dir,
            "best_member": None if best is None else best.member,
            "best_checkpoint_path": None if best is None else best.checkpoint_path,
            "members": [asdict(result) for result in self.members],
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PopulationResults:
        known = {"monitor", "mode", "run_dir", "best_member", "best_checkpoint_path", "members"}
        return cls(
            members=[MemberResult.from_dict(m) for m in data["members"]],
            monitor=str(data["monitor"]),
            mode=str(data["mode"]),
            run_dir=data.get("run_dir"),
            extra={k: v for k, v in data.items() if k not in known},
        )


def rank_results(results: Iterable[MemberResult], mode: str) -> list[MemberResult]:
    """Best first by score (``mode``), unknown scores last, ties by member id.

    Examples:
        >>> results = [MemberResult(m, s, 40, {}, m) for m, s in [(0, 0.5), (1, None), (2, 0.9)]]
        >>> [r.member for r in rank_results(results, "max")], [r.member for r in rank_results(results, "min")]
        ([2, 0, 1], [0, 2, 1])
    """
    by_member = {result.member: result for result in results}
    order = rank_members(sorted(by_member), {m: r.score for m, r in by_member.items()}, mode)
    return [by_member[m] for m in order]


def format_cell(value: Any) -> str:
    """A table cell: ``n/a`` for a missing value, floats to four significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table of ``rows`` under ``header``, every cell through :func:`format_cell`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(format_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_text(results: PopulationResults) -> str:
    """The summary printed once per population at the end of fit: a markdown table of the members, best
    first (score, step, the values they trained with, whose weights they copied last: no copy follows a
    member's last ready step, so its weights are its own from then on), then the best member and the
    checkpoint to load.

    Examples:
        >>> best = MemberResult(1, 0.97, 40, {"lr": 0.05}, 1, "m1.ckpt")
        >>> members = [best, MemberResult(0, 0.9, 40, {"lr": 0.1}, 0, copied_from=1)]
        >>> print(summary_text(PopulationResults(members, "val_acc", "max")))
        Population at the end of fit (val_acc, best first):
        <BLANKLINE>
        | member | val_acc | step | lr | last copied from |
        |---|---|---|---|---|
        | 1 | 0.97 | 40 | 0.05 | - |
        | 0 | 0.9 | 40 | 0.1 | 1 |
        <BLANKLINE>
        Best member: 1 (val_acc 0.97)
        Its checkpoint: m1.ckpt
    """
    names: list[str] = []
    for result in results.members:
        names += [name for name in result.hyperparameters if name not in names]
    header = ["member", results.monitor, "step", *names, "last copied from"]
    lines = [f"Population at the end of fit ({results.monitor}, best first):", ""]
    rows = ([r.member, r.score, r.step, *(r.hyperparameters.get(name) for name in names),
             "-" if r.copied_from is None else r.copied_from] for r in results.members)
    lines += [markdown_table(header, rows), ""]
    best = results.best
    if best is None:
        lines.append("No member has a finite score.")
        return "\n".join(lines)
    lines.append(f"Best member: {best.member} ({results.monitor} {format_cell(best.score)})")
    if best.checkpoint_path is None:
        lines.append("Its checkpoint: none saved")
    else:
        note = ""
        if best.checkpoint_score is not None and best.checkpoint_score != best.score:
            note = f" (its ModelCheckpoint's best, scored {format_cell(best.checkpoint_score)})"
        lines.append(f"Its checkpoint: {best.checkpoint_path}{note}")
    return "\n".join(lines)


def write_results(results: PopulationResults, path: str | os.PathLike[str]) -> Path:
    """Write ``results`` as JSON (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _results_file(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / "pbt" / RESULTS_FILE, path / RESULTS_FILE):
        if candidate.is_file():
            return candidate
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    raise FileNotFoundError(
        f"no {RESULTS_FILE} in {path} or {path / 'pbt'}: PopulationBasedTraining writes it when fit ends (a run "
        "that stopped early has its lineage only: python -m lightning_pbt.report RUN_DIR)"
    )


def load_results(path: str | os.PathLike[str]) -> PopulationResults:
    """A finished run's results: from a run directory, its ``pbt/`` folder or the ``results.json`` file.

    Raises:
        FileNotFoundError: no ``results.json`` there (the run did not finish, or wrote elsewhere).
    """
    return PopulationResults.from_dict(json.loads(_results_file(path).read_text(encoding="utf-8")))


def best_checkpoint(path: str | os.PathLike[str]) -> str:
    """The best member's checkpoint in a finished run (see :func:`load_results`).

    Raises:
        FileNotFoundError: no results, or the checkpoint they name is gone.
        ValueError: no member has a finite score, or nothing was saved for the best member.
    """
    results = load_results(path)
    best = results.best
    if best is None:
        raise ValueError(f"no member of the run in {path} has a finite {results.monitor}")
    if best.checkpoint_path is None:
        raise ValueError(f"nothing was saved for member {best.member}, the best of the run in {path}")
    if not os.path.isfile(best.checkpoint_path):
        raise FileNotFoundError(f"member {best.member}'s checkpoint {best.checkpoint_path} is gone")
    return best.checkpoint_path


def load_best_model(path: str | os.PathLike[str], model_class: Any, **kwargs: Any) -> Any:
    """The best member of a finished run, loaded: ``model_class.load_from_checkpoint(best_checkpoint(path))``.

    Its hyperparameters are the values it trained with last (PBT keeps ``hparams`` current).

    Args:
        path: the run directory (or its ``pbt/`` folder, or ``results.json``).
        model_class: the ``LightningModule`` class the run trained.
        **kwargs: passed to ``load_from_checkpoint`` (``map_location=...``, ``weights_only=...``).

    Examples:
        ```python
        model = load_best_model("lightning_logs/pbt_run", Net, map_location="cpu")
        ```
    """
    return model_class.load_from_checkpoint(best_checkpoint(path), **kwargs)


def results_from_gathered(
    gathered: Sequence[Mapping[str, Any]], monitor: str, mode: str, run_dir: str | None
) -> PopulationResults:
    """One result per member from every rank's contribution (a member's ranks contribute the same facts;
    the first one of each member is kept), best first."""
    by_member: dict[int, MemberResult] = {}
    for item in gathered:
        result = MemberResult.from_dict(item)
        by_member.setdefault(result.member, result)
    return PopulationResults(rank_results(by_member.values(), mode), monitor, mode, run_dir)


def set_aside_previous_run(folder: str | os.PathLike[str]) -> Path | None:
    """Move a previous run's outputs in ``folder`` (its lineage, results, report, plots and the checkpoints
    PBT saved there) together into ``folder/previous_<N>/`` (the first free N), so that nothing of the old
    run sits beside the new one; returns that folder (``None``: nothing to move).

    Examples:
        ```python
        set_aside_previous_run("lightning_logs/pbt")  # -> lightning_logs/pbt/previous_1
        ```
    """
    folder = Path(folder)
    found = [folder / name for name in RUN_OUTPUTS if (folder / name).is_file()]
    found += sorted(folder.glob("member_*.ckpt"))
    if not found:
        return None
    index = 1
    while (folder / f"previous_{index}").exists():
        index += 1
    target = folder / f"previous_{index}"
    target.mkdir()
    for path in found:
        os.replace(path, target / path.name)
    return target
