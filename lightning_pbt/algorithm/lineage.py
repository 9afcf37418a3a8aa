"""Lineage: one strict-JSON line per member and per event, written durably, read back robustly.

The file (``lineage.jsonl``) is the run's memory of who copied whom with which hyperparameters: it is
appended and fsynced at every ready step so a crash loses nothing already decided, read back while
tolerating the half-written line a crash may leave, and turned into the hyperparameter schedule a
final model was actually trained with (:func:`member_schedule`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from lightning_pbt.algorithm.exploit import is_finite_score, rank_members

__all__ = [
    "LineageRecord",
    "LineageWriter",
    "best_member",
    "final_records",
    "member_schedule",
    "read_lineage",
    "records_by_member",
    "truncate_after",
    "truncate_members_after",
]

_REQUIRED = ("step", "epoch", "member", "event", "parent", "hyperparameters")
_FIELDS = (*_REQUIRED, "score", "mutations", "timing", "extra")


def _json_safe(value: Any) -> Any:
    """Strict-JSON copy: numpy scalars -> Python, tuples -> lists, NaN/inf -> None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _int(data: Mapping[str, Any], key: str) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"'{key}' must be an integer, got {value!r}")
    return value


@dataclass
class LineageRecord:
    """One member at one event: ``init``, ``keep``, ``exploit``, ``rejuvenate``, ``stop``, ...

    ``parent`` is the member whose weights this member holds after the event (itself unless it
    exploited); ``hyperparameters`` are the values in effect after it; ``timing`` holds the seconds of
    the ready step's phases (e.g. gather/decide/transfer). In asynchronous mode ``step`` is the member's
    own step and an exploit records ``donor_step``, the step of the parent's snapshot it copied (the line
    has the key only then).

    Attributes:
        step: the global step of the event (asynchronous: the member's own step).
        epoch: the epoch at the event.
        member: the member's id.
        score: the member's score at the ready step (``None`` when unknown or not finite).
        event: ``"init"``, ``"keep"``, ``"exploit"``, ``"rejuvenate"``, ...
        parent: the member whose weights this member holds after the event.
        hyperparameters: the values in effect after the event.
        mutations: what explore changed, as text (``"lr: 0.01 -> 0.012 (x1.2)"``).
        timing: seconds per phase of the ready step, when recorded.
        extra: any other keys of the line (e.g. ``done``).
        donor_step: asynchronous exploits only: the step of the snapshot copied.

    Examples:
        >>> record = LineageRecord(step=100, epoch=2, member=3, score=0.91, event="exploit", parent=0,
        ...                        hyperparameters={"lr": 0.012})
        >>> line = record.to_json()  # one line of lineage.jsonl
        >>> line[:40]
        '{"epoch": 2, "event": "exploit", "extra"'
        >>> LineageRecord.from_dict(json.loads(line)) == record
        True
    """

    step: int
    epoch: int
    member: int
    score: float | None
    event: str
    parent: int
    hyperparameters: dict[str, Any]
    mutations: list[str] = field(default_factory=list)
    timing: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    donor_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON-able dict; a non-finite or missing score becomes ``None``."""
        data = {name: getattr(self, name) for name in _FIELDS}
        data["score"] = float(self.score) if is_finite_score(self.score) else None  # type: ignore[arg-type]
        if self.donor_step is not None:
            data["donor_step"] = int(self.donor_step)
        return _json_safe(data)

    def to_json(self) -> str:
        """One line of strict JSON (sorted keys, no NaN)."""
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LineageRecord:
        """Parse one line's object; unknown top-level keys are kept in ``extra``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a JSON object, got {data!r}")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise ValueError(f"missing key(s) {missing}")
        score = data.get("score")
        if score is not None and not is_finite_score(score):
            raise ValueError(f"'score' must be a number or null, got {score!r}")
        if not isinstance(data["event"], str):
            raise ValueError(f"'event' must be a string, got {data['event']!r}")
        if not isinstance(data["hyperparameters"], Mapping):
            raise ValueError(f"'hyperparameters' must be an object, got {data['hyperparameters']!r}")
        extra = dict(data.get("extra") or {})
        extra.update({k: v for k, v in data.items() if k not in _FIELDS and k != "donor_step"})
        timing = data.get("timing")
        donor_step = None if data.get("donor_step") is None else _int(data, "donor_step")
        return cls(
            step=_int(data, "step"),
            epoch=_int(data, "epoch"),
            member=_int(data, "member"),
            score=None if score is None else float(score),
            event=data["event"],
            parent=_int(data, "parent"),
            hyperparameters=dict(data["hyperparameters"]),
            mutations=[str(m) for m in data.get("mutations") or ()],
            timing=None if timing is None else dict(timing),
            extra=extra,
            donor_step=donor_step,
        )


def _drop_partial_tail(path: Path) -> None:
    """Cut a crash's half-written last line so that appended lines do not fuse with it."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)
        f.flush()
        os.fsync(f.fileno())


class LineageWriter:
    """Appends records to a JSONL file, flushing and fsyncing after every :meth:`write`.

    Opening an existing file appends to it (after dropping a half-written last line, if any).
    :meth:`write_in_background` moves the fsync off the caller's thread: at most one write is in
    flight, and it is durable before the next one starts, before :meth:`wait` returns and at
    :meth:`close`.

    Args:
        path: the JSONL file; its folder is created when missing.

    Examples:
        ```python
        with LineageWriter("outputs/run/pbt/lineage.jsonl") as writer:
            writer.write(record)
        ```
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_tail(self.path)
        self._file = open(self.path, "a", encoding="utf-8", newline="\n")  # noqa: SIM115
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def write_in_background(self, records: Iterable[LineageRecord]) -> None:
        """:meth:`write` on a worker thread, after the previous background write has completed."""
        self.wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning-pbt-lineage")
        self._pending = self._executor.submit(self.write, list(records))

    def wait(self) -> None:
        """Block until the background write (if any) is durable; re-raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def write(self, records: Iterable[LineageRecord] | LineageRecord) -> None:
        """Append ``records`` (one line each) and make them durable before returning."""
        if isinstance(records, LineageRecord):
            records = [records]
        if self._file.closed:
            raise ValueError(f"LineageWriter for {self.path} is closed")
        text = "".join(record.to_json() + "\n" for record in records)
        if not text:
            return
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            if not self._file.closed:
                self._file.close()

    def __enter__(self) -> LineageWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @staticmethod
    def truncate_after(path: str | os.PathLike[str], step: int) -> int:
        """Alias of :func:`truncate_after`."""
        return truncate_after(path, step)


def _parse(path: Path) -> list[tuple[str, LineageRecord]]:
    """(raw line, record) pairs; a last line without its newline that does not parse is ignored."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    out: list[tuple[str, LineageRecord]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append((line, LineageRecord.from_dict(json.loads(line))))
        except (ValueError, TypeError) as err:
            if number == len(lines):  # no newline after it: a write cut short by a crash
                break
            raise ValueError(f"{path}:{number}: corrupt lineage line: {err}") from None
    return out


def read_lineage(path: str | os.PathLike[str]) -> list[LineageRecord]:
    """All records in file order; raises ``ValueError`` naming file and line for a corrupt line.

    Args:
        path: a ``lineage.jsonl`` file. A last line cut short by a crash is ignored.

    Returns:
        The records, in file order.

    Raises:
        ValueError: a line that is not a lineage record, naming the file and the line.
    """
    return [record for _, record in _parse(Path(path))]


def truncate_after(path: str | os.PathLike[str], step: int) -> int:
    """Atomically keep only the ``init`` records and those with ``step <= step`` (used on resume so the
    replayed steps are not written twice). Returns the number of records kept; a missing file is 0.

    Args:
        path: the lineage file, rewritten through a temporary file and ``os.replace``.
        step: the last global step to keep.
    """
    return _keep_records(Path(path), lambda record: record.step <= step)


def truncate_members_after(path: str | os.PathLike[str], steps: Mapping[int, int]) -> int:
    """:func:`truncate_after` per member: member ``m`` keeps its records with ``step <= steps[m]``.

    For an asynchronous run, whose members resume from their own, different steps. Members not in
    ``steps`` keep everything.

    Args:
        path: the lineage file, rewritten atomically.
        steps: ``{member: last step to keep}``.
    """
    return _keep_records(Path(path), lambda record: record.step <= steps.get(record.member, record.step))


def _keep_records(path: Path, keep: Callable[[LineageRecord], bool]) -> int:
    if not path.exists():
        return 0
    kept = [line for line, record in _parse(path) if record.event == "init" or keep(record)]
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return len(kept)


def records_by_member(records: Iterable[LineageRecord]) -> dict[int, list[LineageRecord]]:
    """Each member's records in step order (file order within a step), members in order.

    Args:
        records: a run's lineage records, in file order.
    """
    out: dict[int, list[LineageRecord]] = {}
    ordered = sorted(enumerate(records), key=lambda pair: (pair[1].step, pair[0]))
    for _, record in ordered:
        out.setdefault(record.member, []).append(record)
    return dict(sorted(out.items()))


def member_schedule(records: Iterable[LineageRecord], member: int) -> list[tuple[int, dict[str, Any]]]:
    """The schedule ``[(step, hyperparameters in effect from that step), ...]`` the final model of
    ``member`` was trained with.

    Walks parent links backwards: at an ``exploit`` from parent p the weights came from p, so before it
    the schedule is p's (its records before the copied step). It starts at the root ancestor's ``init``
    record, or at a ``rejuvenate`` (weights re-initialised: earlier training does not count). Steps count
    the training the final weights received: in an asynchronous run a member that copied p's snapshot
    of step d at its own step s continues at d, not s (``donor_step``). Consecutive identical
    hyperparameters collapse into their first step.

    Args:
        records: a run's lineage (:func:`read_lineage`).
        member: whose final weights to follow.

    Returns:
        ``[(step, {name: value}), ...]``, sorted by step; what :class:`~lightning_pbt.plugin.replay.PBTReplay`
        applies.

    Raises:
        ValueError: ``member`` is not in the lineage.

    Examples:
        Member 1 copied member 0 at step 10 and explored to ``lr=0.02``:

        >>> records = [
        ...     LineageRecord(0, 0, 0, None, "init", 0, {"lr": 0.1}),
        ...     LineageRecord(0, 0, 1, None, "init", 1, {"lr": 0.001}),
        ...     LineageRecord(10, 1, 0, 0.9, "keep", 0, {"lr": 0.1}),
        ...     LineageRecord(10, 1, 1, 0.2, "exploit", 0, {"lr": 0.02}),
        ... ]
        >>> member_schedule(records, 1)
        [(0, {'lr': 0.1}), (10, {'lr': 0.02})]
    """
    by_member = records_by_member(records)
    if member not in by_member:
        raise ValueError(f"member {member} has no lineage records")
    # Newest first: each segment's (own step, values) entries, newest first, and the copy that began it.
    segments: list[tuple[list[tuple[int, dict[str, Any]]], tuple[int, int] | None]] = []
    current, upper, seen = member, math.inf, 0
    while True:
        own = [r for r in by_member.get(current, []) if r.step < upper]
        entries: list[tuple[int, dict[str, Any]]] = []
        next_member, copy = None, None
        for record in reversed(own):
            entries.append((record.step, dict(record.hyperparameters)))
            if record.event in ("init", "rejuvenate"):
                break
            if record.event == "exploit" and record.parent != current:
                donor_step = record.step if record.donor_step is None else record.donor_step
                next_member, upper, copy = record.parent, donor_step, (record.step, donor_step)
                break
        segments.append((entries, copy))
        seen += 1
        if next_member is None or seen > sum(len(v) for v in by_member.values()):
            break
        current = next_member
    schedule: list[tuple[int, dict[str, Any]]] = []
    offset = 0
    for entries, copy in reversed(segments):
        if copy is not None:
            offset += copy[1] - copy[0]
        for step, values in reversed(entries):
            if not schedule or schedule[-1][1] != values:
                schedule.append((step + offset, values))
    return schedule


def final_records(records: Iterable[LineageRecord]) -> dict[int, LineageRecord]:
    """The last record of every member (by step, then file order).

    Args:
        records: a run's lineage.

    Returns:
        ``{member: its last record}``, by member id.
    """
    return {member: recs[-1] for member, recs in sorted(records_by_member(records).items())}


def best_member(records: Iterable[LineageRecord], mode: str) -> int:
    """The member whose last record has the best finite score (ties: lower id).

    Args:
        records: a run's lineage.
        mode: ``"max"`` or ``"min"``.

    Raises:
        ValueError: no member's last record has a finite score, or a bad ``mode``.
    """
    final = final_records(records)
    if not any(is_finite_score(r.score) for r in final.values()):
        raise ValueError("no member has a finite score in the lineage")
    return rank_members(list(final), {m: r.score for m, r in final.items()}, mode)[0]
