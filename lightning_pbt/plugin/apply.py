"""Putting hyperparameters into a live run: optimizers, LR schedulers and the LightningModule.

Optimizer hyperparameters. A name that is a key of an optimizer's param groups (``lr``,
``weight_decay``, ``momentum``, ...) is set on every param group that has it, keeping each group's
*initial ratio* to the first group that has the key, counted over all optimizers in order (optimizer
0's groups, then optimizer 1's, ...). A backbone at 1e-4 and a head at 1e-3 get ``v`` and ``10 v``; a
GAN's generator at 2e-4 and discriminator at 1e-4 get ``v`` and ``v / 2``; a group that started at 0
(say ``weight_decay`` on biases and norms) stays at 0. If the first group started at 0, the first group
with a non-zero value is the reference; if all started at 0, all get ``v``. The ratios are taken once
(:func:`capture_group_ratios`, at fit start, from what ``configure_optimizers`` built); values that are
not numbers (``betas``, flags) are set as they are.

Learning rate and LR schedulers. ``lr`` is the *base* rate of a group: without an LR scheduler its
``lr``; with one, its ``initial_lr`` (every ``torch.optim.lr_scheduler.LRScheduler`` writes it: the
scheduler's ``base_lrs``; for ``OneCycleLR`` it is ``max_lr / div_factor``). A new base ``b'``
replacing ``b`` multiplies *every lr-valued quantity of the group* by ``b' / b``, so the schedule keeps
its shape and position: from then on the rate is what the same scheduler, at the same step, would give
had it been built with every lr-valued argument multiplied by ``b' / b``. The quantities:

- every scheduler: the group's ``lr`` and ``initial_lr``, ``base_lrs`` and the last rate (``_last_lr``);
- ``ReduceLROnPlateau`` keeps no base: the first application writes the group's ``initial_lr`` (so the
  base travels with the optimizer's state to a member that copies it); ``min_lrs`` scale too;
- ``OneCycleLR``: the group's ``max_lr`` and ``min_lr`` (it computes each rate from them);
- ``CyclicLR``: ``max_lrs``; ``CosineAnnealingLR`` / ``CosineAnnealingWarmRestarts``: ``eta_min`` (one
  value for all groups, scaled by the first group's factor);
- ``SequentialLR`` / ``ChainedScheduler``: the same, in each scheduler they hold.

A group whose base is 0 has no shape to keep: its ``lr`` and base become the new base.

Module hyperparameters. Any other name must be a key of ``module.hparams`` (``self.save_hyperparameters()``):
it is written there, and the module's optional hook ``on_pbt_hyperparameters(values)`` is called with
every non-optimizer value in effect, e.g. to set ``nn.Dropout.p``.

Rejuvenation (:func:`reset_weights`) re-initialises all submodules or only named ones; see there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, CosineAnnealingWarmRestarts, OneCycleLR, ReduceLROnPlateau

__all__ = [
    "HOOK_NAME",
    "GroupRatios",
    "apply_hyperparameters",
    "capture_group_ratios",
    "check_applicable",
    "check_module_names",
    "reset_weights",
]

HOOK_NAME = "on_pbt_hyperparameters"


def _optimizer_keys(optimizers: Iterable[Optimizer]) -> set[str]:
    return {key for optimizer in optimizers for group in optimizer.param_groups for key in group if key != "params"}


def check_applicable(names: Iterable[str], optimizers: Sequence[Optimizer], module: Any) -> None:
    """Raise a ValueError naming every hyperparameter that nothing would apply.

    Args:
        names: the search space's hyperparameter names.
        optimizers: the Trainer's optimizers (their param-group keys apply).
        module: the LightningModule (its ``hparams`` keys apply).

    Raises:
        ValueError: naming the names that are neither a param-group key nor in ``module.hparams``.
    """
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


# -- param-group ratios ---------------------------------------------------------------------------
def _number(value: Any) -> float | None:
    """A param-group value as a float, or None when it is not one number (tuples, flags, None)."""
    if isinstance(value, torch.Tensor):  # e.g. a capturable optimizer keeps lr as a tensor
        return float(value) if value.numel() == 1 and not value.dtype.is_complex else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _base(group: Mapping[str, Any], key: str) -> Any:
    return group.get("initial_lr", group["lr"]) if key == "lr" else group[key]


def _groups_per_optimizer(optimizers: Sequence[Optimizer]) -> tuple[int, ...]:
    return tuple(len(optimizer.param_groups) for optimizer in optimizers)


@dataclass(frozen=True)
class GroupRatios:
    """Each param group's initial value of every numeric key, relative to the key's reference group.

    ``ratios[key][i][j]`` belongs to group ``j`` of optimizer ``i``: None where that group had no such key
    or no number there; ``initial`` holds the values themselves (for ``lr``, the base rates).
    ``groups`` is the number of param groups per optimizer when they were taken.

    Attributes:
        groups: param groups per optimizer when the ratios were taken.
        initial: ``{key: per optimizer, per group, the initial value}`` (``None``: no number there).
        ratios: ``{key: per optimizer, per group, the ratio to the reference group}``.
    """

    groups: tuple[int, ...]
    initial: Mapping[str, tuple[tuple[float | None, ...], ...]]
    ratios: Mapping[str, tuple[tuple[float | None, ...], ...]]

    def target(self, key: str, value: Any, optimizer: int, group: int) -> Any:
        """The value group ``group`` of optimizer ``optimizer`` gets when ``key`` is searched at ``value``."""
        ratio = self.ratios[key][optimizer][group] if key in self.ratios else None
        if ratio is None or ratio == 1.0 or _number(value) is None:
            return value
        return value * ratio

    def check(self, optimizers: Sequence[Optimizer]) -> None:
        now = _groups_per_optimizer(optimizers)
        if now != self.groups:
            raise ValueError(
                f"PopulationBasedTraining: the optimizers changed since fit start (param groups per optimizer: "
                f"{list(self.groups)} then, {list(now)} now); the group ratios of the hyperparameters are taken "
                "from what configure_optimizers returned, so add every param group there"
            )


def capture_group_ratios(optimizers: Sequence[Optimizer]) -> GroupRatios:
    """Take every numeric key's ratios between the param groups (see the module docstring).

    Args:
        optimizers: the optimizers as ``configure_optimizers`` built them.

    Examples:
        >>> import torch
        >>> backbone, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
        >>> groups = [{"params": backbone.parameters(), "lr": 1e-4}, {"params": head.parameters()}]
        >>> sgd = torch.optim.SGD(groups, lr=1e-3)
        >>> capture_group_ratios([sgd]).ratios["lr"]
        ((1.0, 10.0),)
    """
    initial: dict[str, tuple[tuple[float | None, ...], ...]] = {}
    ratios: dict[str, tuple[tuple[float | None, ...], ...]] = {}
    for key in sorted(_optimizer_keys(optimizers)):
        values = tuple(tuple(_number(_base(g, key)) if key in g else None for g in o.param_groups) for o in optimizers)
        reference = next((v for row in values for v in row if v is not None and v != 0.0), None)
        initial[key] = values
        ratios[key] = tuple(
            tuple(None if v is None else (1.0 if reference is None else v / reference) for v in row) for row in values
        )
    return GroupRatios(_groups_per_optimizer(optimizers), initial, ratios)


def apply_hyperparameters(
    values: Mapping[str, Any],
    optimizers: Sequence[Optimizer],
    schedulers: Sequence[Any],
    module: Any,
    ratios: GroupRatios | None = None,
) -> None:
    """Make ``values`` the hyperparameters in effect.

    Args:
        values: ``{name: value}``: param-group keys go to the optimizers (and their LR schedulers), the
            other names to ``module.hparams`` and the module's ``on_pbt_hyperparameters`` hook.
        optimizers: the Trainer's optimizers.
        schedulers: the Trainer's LR schedulers (any that drive these optimizers).
        module: the LightningModule.
        ratios: the param groups' ratios taken at fit start (:func:`capture_group_ratios`); without
            them, the ratios the groups have now are kept.

    Raises:
        ValueError: the optimizers' param groups changed since ``ratios`` were taken.

    Examples:
        >>> import torch
        >>> backbone, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
        >>> groups = [{"params": backbone.parameters(), "lr": 1e-4}, {"params": head.parameters()}]
        >>> sgd = torch.optim.SGD(groups, lr=1e-3)
        >>> apply_hyperparameters({"lr": 0.01}, [sgd], [], module=None)
        >>> [group["lr"] for group in sgd.param_groups]
        [0.01, 0.1]
    """
    ratios = capture_group_ratios(optimizers) if ratios is None else ratios
    ratios.check(optimizers)
    optimizer_keys = _optimizer_keys(optimizers)
    for name, value in values.items():
        if name not in optimizer_keys:
            continue
        for i, optimizer in enumerate(optimizers):
            targets = [
                ratios.target(name, value, i, j) if name in g else None for j, g in enumerate(optimizer.param_groups)
            ]
            if name == "lr":
                _set_base_lrs(optimizer, targets, schedulers, ratios.initial["lr"][i])
                continue
            for group, target in zip(optimizer.param_groups, targets, strict=True):
                if name in group:
                    _write(group, name, target)
    hparams = getattr(module, "hparams", None)
    if hparams is not None:
        for name, value in values.items():
            if name in hparams or name not in optimizer_keys:
                hparams[name] = value
    hook = getattr(module, HOOK_NAME, None)
    if callable(hook):
        hook({name: value for name, value in values.items() if name not in optimizer_keys})


def _write(group: dict[str, Any], key: str, value: Any) -> None:
    """Set ``group[key]``; a tensor (capturable/fused optimizers) is filled in place, as torch's schedulers do."""
    current = group.get(key)
    if isinstance(current, torch.Tensor) and _number(value) is not None:
        current.fill_(float(value))
    else:
        group[key] = value


# -- learning rate and LR schedulers --------------------------------------------------------------
def _drivers(optimizer: Optimizer, schedulers: Iterable[Any]) -> list[Any]:
    """The schedulers driving ``optimizer``, with those inside SequentialLR / ChainedScheduler, each once."""
    found: dict[int, Any] = {}

    def visit(scheduler: Any) -> None:
        for child in getattr(scheduler, "_schedulers", None) or ():
            visit(child)
        if getattr(scheduler, "optimizer", None) is optimizer:
            found.setdefault(id(scheduler), scheduler)

    for scheduler in schedulers:
        visit(scheduler)
    return list(found.values())


def _same_kind(value: Any, new: float) -> Any:
    return torch.as_tensor(new, dtype=value.dtype, device=value.device) if isinstance(value, torch.Tensor) else new


def _set_base_lrs(
    optimizer: Optimizer, bases: Sequence[Any], schedulers: Sequence[Any], first_bases: Sequence[float | None]
) -> None:
    """Give each param group its new base rate; every lr-valued quantity follows (module docstring).

    ``first_bases``: the groups' base rates at fit start, the base of a ReduceLROnPlateau group that
    has none yet.
    """
    drivers = _drivers(optimizer, schedulers)
    groups = optimizer.param_groups
    if any(isinstance(s, ReduceLROnPlateau) for s in drivers):  # it keeps no base: remember it in the group
        for group, first in zip(groups, first_bases, strict=True):
            if "initial_lr" not in group:
                group["initial_lr"] = _same_kind(group["lr"], float(group["lr"]) if first is None else first)
    new = [float(b) for b in bases]
    old = [float(_base(group, "lr")) for group in groups]
    scales = [n / o if o != 0.0 else None for n, o in zip(new, old, strict=True)]
    common = next((s for s in scales if s is not None), None)
    group_keys = ("max_lr", "min_lr") if any(isinstance(s, OneCycleLR) for s in drivers) else ()
    # Read everything before writing anything: groups may share one lr tensor (an optimizer default).
    writes: list[tuple[dict[str, Any], str, float]] = []
    for group, scale, base in zip(groups, scales, new, strict=True):
        if drivers and scale is not None and "initial_lr" in group:
            writes.append((group, "lr", float(group["lr"]) * scale))
        else:  # without a scheduler the rate is the base itself
            writes.append((group, "lr", base))
        if "initial_lr" in group:
            writes.append((group, "initial_lr", base))
        writes.extend(
            (group, key, float(group[key]) * scale) for key in group_keys if key in group and scale is not None
        )
    for group, key, value in writes:
        _write(group, key, value)
    seen: set[int] = set()
    for scheduler in drivers:
        for attribute in ("base_lrs", "max_lrs", "min_lrs"):
            values = getattr(scheduler, attribute, None)
            if not isinstance(values, list) or len(values) != len(groups) or id(values) in seen:
                continue
            seen.add(id(values))
            for j, (value, scale) in enumerate(zip(values, scales, strict=True)):
                if scale is not None:
                    values[j] = _same_kind(value, float(value) * scale)
                elif attribute == "base_lrs":
                    values[j] = _same_kind(value, new[j])
        if common is not None:
            if isinstance(scheduler, CosineAnnealingLR | CosineAnnealingWarmRestarts):
                scheduler.eta_min = scheduler.eta_min * common
            if isinstance(scheduler, ReduceLROnPlateau) and scheduler.default_min_lr is not None:
                scheduler.default_min_lr = scheduler.default_min_lr * common
        last = getattr(scheduler, "_last_lr", None)
        if isinstance(last, list) and len(last) == len(groups):
            last[:] = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in groups]


# -- rejuvenation ---------------------------------------------------------------------------------
def check_module_names(module: torch.nn.Module, names: Sequence[str]) -> None:
    """Raise a ValueError naming every entry of ``names`` that is not a submodule of ``module``.

    Args:
        module: the model.
        names: submodule names as in ``module.named_modules()``.

    Raises:
        ValueError: naming the unknown names and listing the available ones.
    """
    available = [name for name, _ in module.named_modules() if name]
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(
            f"PopulationBasedTraining: rejuvenate_modules {unknown} are not submodules of {type(module).__name__}; "
            f"available (as in named_modules()): {available}"
        )


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the CPU and every CUDA generator, and give the caller back all of their states afterwards.

    Not ``torch.manual_seed``: it also seeds MPS, XPU and other backends that would not be restored.
    """
    devices = _cuda_devices()
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed_all(seed)
        yield


@torch.no_grad()
def reset_weights(
    module: torch.nn.Module, optimizers: Sequence[Optimizer], seed: int, modules: Sequence[str] | None = None
) -> int:
    """Re-initialise submodules that know how (``reset_parameters``) and clear their optimizer state.

    ``modules``: names as in ``module.named_modules()`` (e.g. ``"head"``, ``"encoder.layer3"``); each is
    reset with its children and only their parameters lose their optimizer state (Adam's moments,
    momentum), every other parameter keeps its weights and state. ``None``: every submodule, and all
    optimizer state. Parameters of modules without ``reset_parameters`` keep their values.

    The draws depend on ``seed`` only (not on the rank), so every rank of a member gets the same fresh
    weights; the caller's CPU and CUDA generators are left as they were. LR schedulers are not touched:
    the member keeps its hyperparameters, its step count and its place in the schedule. Returns how
    many submodules were reset.

    Args:
        module: the model.
        optimizers: the optimizers whose state for the reset parameters is cleared.
        seed: the seed of the fresh weights (the same on every rank of a member).
        modules: the submodules to reset (``None``: all).
    """
    if modules is None:
        targets = [sub for sub in module.modules() if sub is not module]
    else:
        check_module_names(module, modules)
        named = dict(module.named_modules())
        chosen = {id(sub) for name in modules for sub in named[name].modules()}
        targets = [sub for sub in module.modules() if id(sub) in chosen]  # tree order, whatever the names' order
    with _seeded(seed):
        count = 0
        for submodule in targets:
            reset = getattr(submodule, "reset_parameters", None)
            if callable(reset):
                reset()
                count += 1
    if modules is None:
        for optimizer in optimizers:
            optimizer.state.clear()
    else:
        parameters = [p for sub in targets for p in sub.parameters(recurse=False)]
        for optimizer in optimizers:
            for parameter in parameters:
                optimizer.state.pop(parameter, None)
    return count
