"""One console per population: what population ranks other than 0 still print.

Every member's rank 0 is a rank 0 for Lightning, so without the strategy's quieting Lightning's
rank-zero warnings and info messages would appear once per member. In-process: no process group, the
strategy is given a topology by hand. A multi-process run checks the same with real Lightning warnings
(tests/examples/test_cli.py).
"""

from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace

import pytest

from lightning_pbt.plugin.console import QUIET_LOGGERS, quiet_console


@pytest.fixture
def restore_console():
    """The quieting changes process-wide state; put it back for the other tests."""
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    with warnings.catch_warnings():
        yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def _quieted_strategy(world_rank: int) -> SimpleNamespace:
    bar = SimpleNamespace(disabled=False)
    bar.disable = lambda: setattr(bar, "disabled", True)
    trainer = SimpleNamespace(progress_bar_callback=bar, callbacks=[type("RichModelSummary", (), {})()])
    quiet_console(trainer, world_rank)
    return SimpleNamespace(bar=bar, callbacks=trainer.callbacks)


WARNINGS_BY_MODULE = {
    "lightning.pytorch.loops.fit_loop": "from lightning.pytorch",
    "pytorch_lightning.trainer.connectors.data_connector": "from pytorch_lightning",
    "lightning_fabric.utilities.rank_zero": "from lightning_fabric",
    "lightning_pbt.plugin.callback": "from lightning_pbt",
    "__main__": "from the user's script",
    "torch.distributed": "from torch",
    "lightningfast": "from another package whose name starts with lightning",
}


def _emit_warnings() -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        for module, text in WARNINGS_BY_MODULE.items():
            warnings.warn_explicit(text, UserWarning, f"{module}.py", 1, module=module)
    return [str(w.message) for w in caught]


@pytest.mark.usefixtures("restore_console")
def test_population_ranks_other_than_zero_drop_lightning_and_pbt_warnings_and_info():
    warnings.simplefilter("always")  # what the user's own settings may be; the quieting comes first
    strategy = _quieted_strategy(world_rank=1)
    assert strategy.bar.disabled
    assert strategy.callbacks == []  # rich's model summary prints past logging: the callback goes
    assert _emit_warnings() == [
        "from the user's script",
        "from torch",
        "from another package whose name starts with lightning",
    ]
    for name in ("lightning.pytorch.utilities.rank_zero", "pytorch_lightning", "lightning_fabric", "lightning_pbt"):
        logger = logging.getLogger(name)
        assert not logger.isEnabledFor(logging.WARNING), name
        assert logger.isEnabledFor(logging.ERROR), name  # errors still appear from every rank


@pytest.mark.usefixtures("restore_console")
def test_population_rank_zero_keeps_everything():
    warnings.simplefilter("always")
    strategy = _quieted_strategy(world_rank=0)
    assert not strategy.bar.disabled and len(strategy.callbacks) == 1
    assert _emit_warnings() == list(WARNINGS_BY_MODULE.values())


@pytest.mark.usefixtures("restore_console")
def test_a_member_taking_turns_on_rank_zero_loses_its_bar_and_summary_but_keeps_the_processs_console():
    """Lane 1 of population rank 0 (members_per_process=2): lane 0 speaks for the process, so lane 1 shows
    no progress bar or model summary; the process-wide quieting would silence lane 0 and the population's
    warnings too, so it is not applied."""
    warnings.simplefilter("always")
    bar = SimpleNamespace(disabled=False)
    bar.disable = lambda: setattr(bar, "disabled", True)
    ModelSummary = type("ModelSummary", (), {})
    other = object()
    trainer = SimpleNamespace(progress_bar_callback=bar, callbacks=[ModelSummary(), other])
    quiet_console(trainer, 0, lane=1)
    assert bar.disabled and trainer.callbacks == [other]
    assert len(_emit_warnings()) == len(WARNINGS_BY_MODULE)
    assert all(logging.getLogger(name).level != logging.ERROR for name in QUIET_LOGGERS)
    first = SimpleNamespace(progress_bar_callback=SimpleNamespace(disabled=False), callbacks=[ModelSummary()])
    quiet_console(first, 0, lane=0)
    assert not first.progress_bar_callback.disabled and len(first.callbacks) == 1
