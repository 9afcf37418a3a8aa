"""Putting hyperparameters into a live run: optimizers, LR schedulers and the LightningModule.

A name that is a key of an optimizer's param groups (``lr``, ``weight_decay``, ``momentum``, ...) is
set on every param group that has it. With an LR scheduler, ``lr`` is the *base* value: the current
rate and the scheduler's ``base_lrs`` are scaled by the same ratio, so the schedule keeps its shape
around the new base. Any other name must be a key of ``module.hparams`` (``self.save_hyperparameters()``):
it is written there, and the module's optional hook ``on_pbt_hyperparameters(values)`` is called with
every non-optimizer value in effect, e.g. to set ``nn.Dropout.p``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["HOOK_NAME", "apply_hyperparameters", "check_applicable", "reset_weights"]

HOOK_NAME = "on_pbt_hyperparameters"


def _optimizer_keys(optimizers: Iterable[Optimizer]) -> set[str]:
    return {key for optimizer in optimizers for group in optimizer.param_groups for key in group if key != "params"}


def check_applicable(names: Iterable[str], optimizers: Sequence[Optimizer], module: Any) -> None:
    """Raise a ValueError naming every hyperparameter that nothing would apply."""
    optimizer_keys = _optimizer_keys(optimizers)
    hparams = set(getattr(module, "hparams", {}) or {})
    unknown = [name for name in names if name not in optimizer_keys and name not in hparams]
    if unknown:
        raise ValueError(
            f"PopulationBasedTraining: hyperparameter(s) {unknown} can be applied neither to an optimizer "
            f"(param-group keys: {sorted(optimizer_keys)}) nor to {type(module).__name__}.hparams "
            f"(keys: {sorted(hparams)}); add them with self.save_hyperparameters() and read them from "
            f"self.hparams or the `{HOOK_NAME}` hook, or remove them from the search space"
        )


def apply_hyperparameters(
    values: Mapping[str, Any], optimizers: Sequence[Optimizer], schedulers: Sequence[Any], module: Any
) -> None:
    """Make ``values`` the hyperparameters in effect."""
    optimizer_keys = _optimizer_keys(optimizers)
    for optimizer in optimizers:
        for index, group in enumerate(optimizer.param_groups):
            for name, value in values.items():
                if name not in group:
                    continue
                if name == "lr":
                    _set_base_lr(optimizer, index, float(value), schedulers)
                else:
                    group[name] = _as_group_value(group[name], value)
    hparams = getattr(module, "hparams", None)
    if hparams is not None:
        for name, value in values.items():
            if name in hparams or name not in optimizer_keys:
                hparams[name] = value
    hook = getattr(module, HOOK_NAME, None)
    if callable(hook):
        hook({name: value for name, value in values.items() if name not in optimizer_keys})


def _as_group_value(current: Any, value: Any) -> Any:
    if isinstance(current, torch.Tensor):  # e.g. a capturable optimizer keeps lr as a tensor
        return torch.as_tensor(value, dtype=current.dtype, device=current.device)
    return value


def _set_base_lr(optimizer: Optimizer, index: int, lr: float, schedulers: Sequence[Any]) -> None:
    group = optimizer.param_groups[index]
    for scheduler in schedulers:
        if getattr(scheduler, "optimizer", None) is optimizer and hasattr(scheduler, "base_lrs"):
            base = float(scheduler.base_lrs[index])
            ratio = lr / base if base != 0 else None
            current = float(group["lr"])
            group["lr"] = _as_group_value(group["lr"], current * ratio if ratio is not None else lr)
            scheduler.base_lrs[index] = lr
            if "initial_lr" in group:
                group["initial_lr"] = lr
            last = getattr(scheduler, "_last_lr", None)
            if isinstance(last, list) and index < len(last):
                last[index] = float(group["lr"])
            return
    group["lr"] = _as_group_value(group["lr"], lr)
    if "initial_lr" in group:
        group["initial_lr"] = lr


@torch.no_grad()
def reset_weights(module: torch.nn.Module, optimizers: Sequence[Optimizer], seed: int) -> int:
    """Re-initialise every submodule that knows how (``reset_parameters``) and clear optimizer state.

    Seeded, so every rank of a member draws the same fresh weights. Returns how many submodules were
    reset; parameters of modules without ``reset_parameters`` keep their values.
    """
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        count = 0
        for submodule in module.modules():
            reset = getattr(submodule, "reset_parameters", None)
            if callable(reset) and submodule is not module:
                reset()
                count += 1
    finally:
        torch.random.set_rng_state(state)
    for optimizer in optimizers:
        optimizer.state.clear()
    return count
