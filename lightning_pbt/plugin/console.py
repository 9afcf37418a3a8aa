"""One console per population: the progress bar, info messages, warnings and errors said once.

Every member's rank 0 is a rank 0 for Lightning (``rank_zero_only``), so Lightning's rank-zero messages
would otherwise appear once per member instead of once per run. Loggers stay member-scoped
(``rank_zero_only.rank`` is not touched here).

- :func:`quiet_console`: on population ranks other than 0, no progress bar, info or warnings.
- :func:`ready_step_line` / :func:`say`: one line per ready step for the whole population, printed by
  population rank 0 (through the progress bar when there is one, so that it does not break the bar).
- :func:`install_error_hook`: an uncaught error is printed labelled with its member (not torch's
  ``[rank0]``, which every member's rank 0 shares), and only by the rank that failed first when every
  rank raises the same error (a decision broadcast to all of them); a rank stopped because another
  failed says so in one line. With members that take turns, the member is the one whose lane raised
  (:func:`mark_failed_lane`).
"""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import redirect_stderr, suppress
from typing import Any

__all__ = [
    "QUIET_LOGGERS",
    "QUIET_WARNING_MODULES",
    "error_report",
    "failed_lane",
    "install_error_hook",
    "mark_failed_lane",
    "quiet_console",
    "ready_step_line",
    "remember_excepthook",
    "say",
]

# Set to ERROR on population ranks != 0.
QUIET_LOGGERS = (
    "pytorch_lightning",
    "lightning.pytorch",
    "lightning_fabric",
    "lightning.fabric",
    "lightning_utilities",
    "lightning_pbt",
)
# Warnings attributed to these packages (rank_zero_warn points at its Lightning caller) are dropped there.
QUIET_WARNING_MODULES = r"(pytorch_lightning|lightning_fabric|lightning_utilities|lightning_pbt|lightning)(\.|$)"


def quiet_console(trainer: Any, world_rank: int, lane: int = 0) -> None:
    """Everywhere but lane 0 of population rank 0: no progress bar and no model summary for this trainer
    (``RichModelSummary`` prints with rich's console, which logging levels do not reach). On population
    ranks other than 0 also raise the Lightning and lightning_pbt loggers to ERROR and ignore their
    warnings (process-wide logging and warning state); a member that takes turns in lane ``lane`` > 0 of
    population rank 0 keeps them, or it would silence lane 0 (and the population's warnings) too.

    Args:
        trainer: the Trainer (its ``progress_bar_callback`` and callbacks).
        world_rank: this rank in the whole population; rank 0 keeps everything.
        lane: which of the members this process hosts the trainer is (``members_per_process``).
    """
    if world_rank == 0 and lane == 0:
        return
    progress_bar = trainer.progress_bar_callback
    if progress_bar is not None:
        progress_bar.disable()
    summaries = ("ModelSummary", "RichModelSummary")
    trainer.callbacks = [c for c in getattr(trainer, "callbacks", []) if type(c).__name__ not in summaries]
    if world_rank == 0:
        return
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=QUIET_WARNING_MODULES)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def ready_step_line(
    step: int, plans: Mapping[int, Any], scores: Mapping[int, float | None], monitor: str, mode: str, last: bool = False
) -> str:
    """The one console line of a ready step: the best member, then who copied whom and what explore did.

    Args:
        step: the ready step's global step.
        plans: ``{member: MemberPlan}`` (its ``event``, ``parent`` and ``mutations``).
        scores: ``{member: score}`` as the decision saw them.
        monitor: the score's name.
        mode: ``"max"`` or ``"min"``.
        last: the members' last ready step (they keep the values they trained with).

    Examples:
        >>> from lightning_pbt.algorithm.scheduler import MemberPlan
        >>> plans = {0: MemberPlan(0, "exploit", 1, {"lr": 0.012}, ("lr: 0.01 -> 0.012 (x1.2)",)),
        ...          1: MemberPlan(1, "keep", 1, {"lr": 0.01})}
        >>> ready_step_line(40, plans, {0: 0.5, 1: 0.9}, "val_acc", "max")
        'PBT step 40: best member 1 (val_acc 0.9); member 0 copied member 1, lr: 0.01 -> 0.012 (x1.2); 1 kept'
    """
    from lightning_pbt.algorithm.exploit import rank_members

    finite = {m: s for m, s in scores.items() if s is not None}
    head = f"PBT step {step}: "
    if finite:
        best = rank_members(sorted(finite), finite, mode)[0]
        head += f"best member {best} ({monitor} {_fmt(finite[best])})"
    else:
        head += f"no member has a finite {monitor}"
    changes, kept = [], []
    for member, plan in sorted(plans.items()):
        if plan.event == "exploit":
            changes.append(f"member {member} copied member {plan.parent}, " + ", ".join(plan.mutations))
        elif plan.event == "rejuvenate":
            changes.append(f"member {member} got fresh weights")
        else:
            kept.append(str(member))
    if kept:
        changes.append("every member kept" if len(kept) == len(plans) else ", ".join(kept) + " kept")
    line = "; ".join([head, *changes])
    return line + (" (last ready step: no explore)" if last else "")


def say(trainer: Any, text: str) -> None:
    """Print ``text`` to the console: through the progress bar when it shows (so that the bar stays
    whole), else to standard output."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is not None and getattr(bar, "is_enabled", False):
        bar.print(text)
    else:
        print(text, flush=True)


def error_report(error: BaseException, member: int, world_rank: int, first_failure: Mapping[str, Any] | None) -> str:
    """How an uncaught error is reported on this rank: ``"full"`` (the traceback), ``"line"`` (one line:
    it stopped because another rank failed) or ``"none"`` (the same error, printed by the rank that
    failed first).

    Args:
        error: the uncaught exception.
        member: this rank's member.
        world_rank: this rank in the population.
        first_failure: the first failure the population recorded, ``{"rank": world rank, "reason": text}``
            (``None``: none recorded, or the record could not be read).

    Examples:
        >>> first = {"rank": 0, "reason": "member 0 (world rank 0) raised RuntimeError: bad"}
        >>> error_report(RuntimeError("bad"), 2, 2, first), error_report(RuntimeError("bad"), 0, 0, first)
        ('none', 'full')
        >>> error_report(ValueError("other"), 2, 2, first)
        'full'
    """
    if type(error).__name__ == "PopulationAborted":
        return "line"
    if not first_failure or first_failure.get("rank") == world_rank:
        return "full"
    reason = str(first_failure.get("reason", ""))
    return "none" if reason.endswith(f"raised {type(error).__name__}: {error}") else "full"


_LANE_ATTRIBUTE = "lightning_pbt_lane"


def mark_failed_lane(error: BaseException, lane: int) -> None:
    """Remember on ``error`` which lane of its process raised it (the first mark stays): with members that
    take turns, one process hosts several members and the error hook names the one that failed."""
    if not hasattr(error, _LANE_ATTRIBUTE):
        with suppress(AttributeError, TypeError):  # a type without attributes: labelled by its process
            setattr(error, _LANE_ATTRIBUTE, lane)


def failed_lane(error: BaseException) -> int | None:
    """The lane :func:`mark_failed_lane` recorded on ``error`` (``None``: not marked)."""
    lane = getattr(error, _LANE_ATTRIBUTE, None)
    return lane if isinstance(lane, int) else None


def install_error_hook(
    member: int, world_rank: int, read_first_failure: Callable[[], str | None], lane_members: Sequence[int] = ()
) -> None:
    """Report uncaught errors per member (see :func:`error_report`), replacing torch's ``[rank<N>]`` prefix.

    The hook that was in place before ``torch.distributed`` added its own formats the traceback.

    Args:
        member: this rank's member (the label of an error no lane is marked on).
        world_rank: this rank in the population.
        read_first_failure: the population's first recorded failure, as JSON text (``None``: none).
        lane_members: members that take turns: the process's members in lane order; an error marked
            with its lane (:func:`mark_failed_lane`) is labelled with that lane's member.
    """
    previous = _HOOK_BEFORE_TORCH[0] if _HOOK_BEFORE_TORCH else sys.__excepthook__

    def hook(kind: type[BaseException], error: BaseException, traceback: Any) -> None:
        lane = failed_lane(error)
        failed = lane_members[lane] if lane is not None and 0 <= lane < len(lane_members) else member
        try:
            raw = read_first_failure()
            first = json.loads(raw) if raw else None
        except Exception:  # the store may be gone: print everything rather than nothing
            first = None
        how = error_report(error, failed, world_rank, first)
        if how == "none":
            return
        prefix = f"[member {failed}, rank {world_rank}]"
        if how == "line":
            sys.stderr.write(f"{prefix} stopped: {error}\n")
            sys.stderr.flush()
            return
        buffer = io.StringIO()
        with redirect_stderr(buffer):
            previous(kind, error, traceback)
        text = "\n".join(f"{prefix} {line}" if line else "" for line in buffer.getvalue().split("\n"))
        sys.stderr.write(text)
        sys.stderr.flush()

    sys.excepthook = hook


_HOOK_BEFORE_TORCH: list[Callable[..., Any]] = []


def remember_excepthook() -> None:
    """Keep the hook in place before ``torch.distributed`` wraps it (call before ``init_process_group``)."""
    if not _HOOK_BEFORE_TORCH:
        _HOOK_BEFORE_TORCH.append(sys.excepthook)
