"""Whether two members' optimizers can exchange state: a JSON-able description of each rank's
optimizers, compared before any transfer so that a mismatch is a clear error on every rank instead of a
``load_state_dict`` failure halfway through an exploit. The callback describes its optimizers; the
ready-step protocol compares the descriptions it gathered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch.optim import Optimizer

__all__ = ["describe_layout_mismatch", "optimizer_layout"]


def optimizer_layout(optimizers: Sequence[Optimizer]) -> list[dict[str, Any]]:
    """A JSON-able description of the optimizers: type, and per param group its parameter count, their
    total size and its keys. Two members can exchange optimizer state only if theirs are equal.

    Args:
        optimizers: the Trainer's optimizers.
    """
    return [
        {
            "type": type(optimizer).__name__,
            "groups": [
                {
                    "params": len(group["params"]),
                    "numel": sum(int(p.numel()) for p in group["params"]),
                    "keys": sorted(key for key in group if key != "params"),
                }
                for group in optimizer.param_groups
            ],
        }
        for optimizer in optimizers
    ]


def describe_layout_mismatch(donor: Sequence[Mapping[str, Any]], loser: Sequence[Mapping[str, Any]]) -> str | None:
    """None when two :func:`optimizer_layout` results match, else the first difference, in words.

    Args:
        donor: the donor's :func:`optimizer_layout`.
        loser: the loser's :func:`optimizer_layout`.
    """
    if len(donor) != len(loser):
        return f"the donor has {len(donor)} optimizer(s), the loser {len(loser)}"
    for i, (d, lo) in enumerate(zip(donor, loser, strict=True)):
        if d["type"] != lo["type"]:
            return f"optimizer {i} is a {d['type']} in the donor and a {lo['type']} in the loser"
        if len(d["groups"]) != len(lo["groups"]):
            return (
                f"optimizer {i} ({d['type']}) has {len(d['groups'])} param group(s) in the donor, "
                f"{len(lo['groups'])} in the loser"
            )
        for j, (dg, lg) in enumerate(zip(d["groups"], lo["groups"], strict=True)):
            where = f"optimizer {i} ({d['type']}) param group {j}"
            if dg["params"] != lg["params"] or dg["numel"] != lg["numel"]:
                return (
                    f"{where} holds {dg['params']} parameter(s) of {dg['numel']} elements in the donor, "
                    f"{lg['params']} of {lg['numel']} in the loser"
                )
            if dg["keys"] != lg["keys"]:
                only_donor = sorted(set(dg["keys"]) - set(lg["keys"]))
                only_loser = sorted(set(lg["keys"]) - set(dg["keys"]))
                return f"{where} has keys {only_donor} only in the donor and {only_loser} only in the loser"
    return None
