"""Every private Lightning (and torch) internal lightning_pbt relies on, in one place.

A population needs a few things Lightning has no public hook for: where ``fit`` resolves
``ckpt_path="last"``, the run directory, the launcher, the per-member logger folders. Each use is listed
here with what we rely on and the releases it was checked against (``make test-versions``).
:func:`check` looks for them in the installed Lightning, so that a release that moved one fails with a
message naming it (``python -m lightning_pbt.internals``), not deep inside a multi-process run. A unit
test keeps this list and the code in step: a private name used in ``lightning_pbt`` that is not ours
and not listed here fails it.

Not listed because nothing calls them, but the design depends on them (see ``strategy.py``): Lightning's
default-group collectives (``DDPStrategy.broadcast``/``barrier``, ``_sync_module_states``, and since 2.5.2
``_TrainingEpochLoop._broadcast_sigterm_tensor``) stay inside a member because the member's group is
the default group.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["CHECKED_LIGHTNING", "CHECKED_TORCH", "INTERNALS", "Internal", "check"]

# The Lightning releases (pytorch-lightning and lightning alike) the core tests passed with, oldest and
# newest; see docs/versions.md for the releases that failed and why.
CHECKED_LIGHTNING = ("2.6.0", "2.6.6")
CHECKED_TORCH = ("2.13.0",)


@dataclass(frozen=True)
class Internal:
    """One private name: ``tokens`` are the private identifiers our source uses for it.

    Attributes:
        name: the internal, as a dotted path.
        package: ``"lightning"`` (either flavour) or ``"torch"``.
        used_in: where lightning_pbt uses it.
        relied_on: what we rely on it doing.
        tokens: the private identifiers our source uses for it (the unit test looks for them).
        probe: given ``"pytorch_lightning"`` or ``"lightning.pytorch"``, whether the installed release
            still has it (``None``: not checkable).
    """

    name: str
    package: str  # "lightning" (either flavour) or "torch"
    used_in: str
    relied_on: str
    tokens: tuple[str, ...]
    probe: Callable[[str], bool] | None = None  # given "pytorch_lightning" or "lightning.pytorch"


def _module(package: str, name: str) -> Any:
    return importlib.import_module(f"{package}.{name}" if name else package)


def _parameters(function: Any) -> list[str]:
    return [name for name in inspect.signature(function).parameters if name != "self"]


def _source_has(function: Any, text: str) -> bool:
    return text in inspect.getsource(function)


def _probe_fit_impl_ckpt_index(package: str) -> bool:
    from lightning_pbt.distributed.resume import FIT_CKPT_INDEX, FIT_WEIGHTS_ONLY_INDEX

    parameters = _parameters(_module(package, "").Trainer._fit_impl)
    return (
        parameters.index("ckpt_path") == FIT_CKPT_INDEX and parameters.index("weights_only") == FIT_WEIGHTS_ONLY_INDEX
    )


def _probe_parse_ckpt_path(package: str) -> bool:
    connector = _module(package, "trainer.connectors.checkpoint_connector")._CheckpointConnector
    trainer = _module(package, "").Trainer
    expected = ["state_fn", "ckpt_path", "model_provided", "model_connected"]
    return _parameters(connector._parse_ckpt_path) == expected and _source_has(trainer, "self._checkpoint_connector =")


def _probe_default_root_dir(package: str) -> bool:
    trainer = _module(package, "").Trainer
    return _source_has(trainer.default_root_dir.fget, "self._default_root_dir")


def _probe_launcher(package: str) -> bool:
    ddp = _module(package, "strategies").DDPStrategy
    launcher = _module(package, "strategies.launchers.subprocess_script")._SubprocessScriptLauncher
    return _source_has(ddp._configure_launcher, "self._launcher =") and _parameters(launcher.launch) == [
        "function",
        "args",
        "trainer",
        "kwargs",
    ]


def _probe_ddp_attributes(package: str) -> bool:
    ddp = _module(package, "strategies").DDPStrategy
    init = inspect.getsource(ddp.__init__)
    return (
        "self._timeout" in init and "self._process_group_backend" in init and hasattr(ddp, "_get_process_group_backend")
    )


def _probe_logger_folders(package: str) -> bool:
    logger = _module(package, "loggers").CSVLogger(save_dir="unused")  # writes nothing until first used
    return isinstance(logger._root_dir, str) and isinstance(logger._save_dir, str) and logger._experiment is None


def _probe_sigterm_exception(package: str) -> bool:
    return hasattr(_module(package, "utilities.exceptions"), "SIGTERMException")


def _probe_save_config_callback(package: str) -> bool:
    cli = _module(package, "cli")
    return _source_has(cli.SaveConfigCallback.setup, "self.save_to_log_dir")


def _probe_generate_state_key(package: str) -> bool:
    return callable(getattr(_module(package, "callbacks").Callback, "_generate_state_key", None))


def _probe_load_checkpoint_weights_only(package: str) -> bool:
    strategy = _module(package, "strategies").Strategy
    return "weights_only" in _parameters(strategy.load_checkpoint)



def _probe_weight_averaging_model(package: str) -> bool:
    averaging = _module(package, "callbacks").WeightAveraging
    return _source_has(averaging.setup, "self._average_model = AveragedModel(") and _source_has(
        averaging.state_dict, "latest_update_step"
    )

INTERNALS: tuple[Internal, ...] = (
    Internal(
        "Trainer._fit_impl (its name and the positions of ckpt_path and weights_only)",
        "lightning",
        "strategy._call_scoped, turns.run_member_lanes",
        "the launcher calls Trainer._fit_impl(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, "
        "...); ckpt_path='last' is resolved per member before it runs; nothing is attached to the Trainer yet, "
        "so members that take turns deep-copy the Trainer, model and data arguments there",
        ("_fit_impl",),
        _probe_fit_impl_ckpt_index,
    ),
    Internal(
        "Trainer._checkpoint_connector._parse_ckpt_path(state_fn, ckpt_path, model_provided, model_connected)",
        "lightning",
        "resume.fit_checkpoint",
        "resolves 'last' against the member's own checkpoint folder, before the process groups exist",
        ("_checkpoint_connector", "_parse_ckpt_path"),
        _probe_parse_ckpt_path,
    ),
    Internal(
        "Trainer._default_root_dir",
        "lightning",
        "outputs.agree_on_run_dir",
        "set to population rank 0's folder; Trainer.default_root_dir (and log_dir without a logger) reads it",
        ("_default_root_dir",),
        _probe_default_root_dir,
    ),
    Internal(
        "DDPStrategy._configure_launcher / self._launcher / launcher.launch(function, *args, trainer=, **kwargs)",
        "lightning",
        "strategy.PopulationStrategy._configure_launcher",
        "the launcher is wrapped so that every process scopes its output folders before fit",
        ("_configure_launcher", "_launcher"),
        _probe_launcher,
    ),
    Internal(
        "DDPStrategy._timeout, _process_group_backend, _get_process_group_backend()",
        "lightning",
        "strategy.PopulationStrategy.setup_distributed",
        "the strategy creates the process groups itself with DDPStrategy's timeout and backend choice",
        ("_timeout", "_process_group_backend", "_get_process_group_backend"),
        _probe_ddp_attributes,
    ),
    Internal(
        "Logger _root_dir / _save_dir / _experiment",
        "lightning",
        "outputs.scope_outputs, outputs.rebase_outputs",
        "a logger's folder can be moved to member_<id>/ while _experiment is still None (nothing written yet)",
        ("_root_dir", "_save_dir", "_experiment"),
        _probe_logger_folders,
    ),
    Internal(
        "utilities.exceptions.SIGTERMException (by class name)",
        "lightning",
        "strategy.PopulationStrategy.on_exception",
        "a preemption reaches every rank by itself, so it does not raise the population's abort flag",
        (),
        _probe_sigterm_exception,
    ),
    Internal(
        "cli.SaveConfigCallback.save_to_log_dir (set after construction, known by class name)",
        "lightning",
        "outputs.scope_outputs",
        "without a logger only member 0 writes config.yaml into the shared run directory",
        (),
        _probe_save_config_callback,
    ),
    Internal(
        "Callback._generate_state_key",
        "lightning",
        "callback.PopulationBasedTraining.state_key",
        "the key of the callback's state in checkpoints, built the way Lightning's own callbacks build theirs",
        ("_generate_state_key",),
        _probe_generate_state_key,
    ),
    Internal(
        "Strategy.load_checkpoint(checkpoint_path, weights_only) (overridden; weights_only since 2.6.0)",
        "lightning",
        "strategy.PopulationStrategy.load_checkpoint",
        "checkpoints load with weights_only=True unless the user asks otherwise",
        (),
        _probe_load_checkpoint_weights_only,
    ),
    Internal(
        "WeightAveraging._average_model (the AveragedModel it builds at setup('fit'))",
        "lightning",
        "trainer_member.averaging_state / load_averaging_state",
        "an exploit moves the donor's running average: WeightAveraging.state_dict() holds only the last update "
        "step, the average itself is this AveragedModel's state",
        ("_average_model",),
        _probe_weight_averaging_model,
    ),
    Internal(
        "ProcessGroupNCCL.Options._timeout",
        "torch",
        "collectives.PopulationGroup.create",
        "the population's NCCL group gets the strategy's timeout (no public setter; the field of Backend.Options, "
        "pinned by tests/unit/test_transport.py)",
        ("_timeout",),
    ),
    Internal(
        "SequentialLR._schedulers / ChainedScheduler._schedulers",
        "torch",
        "apply._set_base_lr (via the scheduler walk)",
        "a new base lr reaches the schedulers a SequentialLR or ChainedScheduler holds",
        ("_schedulers",),
    ),
    Internal(
        "LRScheduler._last_lr",
        "torch",
        "apply.apply_hyperparameters",
        "after a new base lr, get_last_lr() reports the value in effect",
        ("_last_lr",),
    ),
)


def check(package: str = "pytorch_lightning") -> list[str]:
    """What the installed ``package`` (``pytorch_lightning`` or ``lightning.pytorch``) no longer provides.

    Args:
        package: the Lightning flavour to probe.

    Returns:
        One line per missing internal (empty: everything is there).
    """
    problems = []
    for internal in INTERNALS:
        if internal.probe is None:
            continue
        try:
            ok = internal.probe(package)
        except Exception as error:  # a moved module or method is exactly what this looks for
            ok, internal_error = False, f" ({type(error).__name__}: {error})"
        else:
            internal_error = ""
        if not ok:
            problems.append(f"{package}: {internal.name}{internal_error}; used by {internal.used_in}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_pbt.internals [PACKAGE ...]``: 0 when every internal is found, else 1.

    Args:
        argv: the Lightning packages to check (default: ``sys.argv[1:]``, else ``pytorch_lightning``).
    """
    packages = list(sys.argv[1:] if argv is None else argv) or ["pytorch_lightning"]
    if packages[0] in ("-h", "--help"):
        print("usage: python -m lightning_pbt.internals [pytorch_lightning] [lightning.pytorch]")
        return 0
    found = [problem for package in packages for problem in check(package)]
    checked = sum(internal.probe is not None for internal in INTERNALS)
    print("\n".join(found) if found else f"all {checked} Lightning internals found in {', '.join(packages)}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
