"""What an exploit moves of Lightning's weight averages (single-process fits, no process group): the
running average and its count move; its clock and every other callback stay with the member.

The population runs (tests/distributed/test_realistic.py) check the same through real transfers; here the
state arrives in fresh tensors and is loaded, as every receive that is not in place does, for both
callbacks, whatever path a population run's transport happens to take."""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, EMAWeightAveraging, ModelCheckpoint, StochasticWeightAveraging
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pbt.plugin.trainer_member import TrainerMember, averaging_state, load_averaging_state, weight_averages


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        return self.body(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fitted(make_callback, seed: int, epochs: int):
    pl.seed_everything(seed, verbose=False)
    callback = make_callback()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = DataLoader(TensorDataset(torch.randn(32, 4) + seed), batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Tiny(), data)
    return callback


def through_the_wire(state):
    """The donor's state as a loser receives it outside the in-place path: fresh tensors, same values."""
    return copy.deepcopy(state)


def same(a, b) -> bool:
    """Equal nests, tensors bit for bit (dtype, shape and values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


CALLBACKS = {
    "ema": lambda: EMAWeightAveraging(decay=0.5),
    "swa": lambda: StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1),
}


@pytest.mark.parametrize("kind", sorted(CALLBACKS))
def test_the_running_average_moves_bit_exactly_and_the_clock_stays(kind):
    donor, loser = fitted(CALLBACKS[kind], seed=1, epochs=3), fitted(CALLBACKS[kind], seed=2, epochs=2)
    assert not same(averaging_state(donor), averaging_state(loser))  # members hold averages of their own
    clock = loser.state_dict().get("latest_update_step", loser.state_dict().get("latest_update_epoch"))
    load_averaging_state(loser, through_the_wire(averaging_state(donor)))
    assert same(averaging_state(loser), averaging_state(donor))
    if kind == "swa":  # the live count SWA goes on averaging with, not only the one it would start from
        assert int(loser.n_averaged) == int(donor.n_averaged) == 3
    # Its own last update stays: it follows the member's steps, which an exploit does not change.
    assert clock == loser.state_dict().get("latest_update_step", loser.state_dict().get("latest_update_epoch"))


def test_only_weight_averages_move_other_callbacks_stay():
    ema, swa = CALLBACKS["ema"](), CALLBACKS["swa"]()
    callbacks = [ModelCheckpoint(), EarlyStopping(monitor="val_loss"), ema, swa]
    assert [callback for _, callback in weight_averages(callbacks)] == [ema, swa]
    assert [key for key, _ in weight_averages(callbacks)] == [ema.state_key, swa.state_key]


def member(schedulers: list, callbacks: list) -> TrainerMember:
    """A rank's training state as the callback composes it, over a trainer reduced to what it reads."""
    module = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    trainer = SimpleNamespace(
        lightning_module=module,
        optimizers=[optimizer],
        lr_scheduler_configs=[SimpleNamespace(scheduler=make(optimizer)) for make in schedulers],
        precision_plugin=SimpleNamespace(state_dict=dict),
        callbacks=callbacks,
    )
    return TrainerMember(trainer, module, lambda: None, None)


def warmup(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def swalr(optimizer):
    return torch.optim.swa_utils.SWALR(optimizer, swa_lr=0.05)


@pytest.mark.parametrize(
    ("donor", "loser", "message"),
    [
        (member([swalr], []), member([warmup], []), r"\['SWALR'\] differ from this member's \['LambdaLR'\]"),
        (member([warmup], []), member([], []), r"LR schedulers \['LambdaLR'\] differ from this member's \[\]"),
        (member([], [CALLBACKS["ema"]()]), member([], []), r"weight-averaging callbacks \['EMAWeightAveraging'\]"),
    ],
    ids=["swa-started-in-the-donor-only", "scheduler-in-the-donor-only", "average-in-the-donor-only"],
)
def test_a_donor_of_another_kind_is_refused_before_anything_loads(donor, loser, message):
    """E.g. asynchronous members on either side of the epoch where SWA swaps in its SWALR: a clear error
    instead of a KeyError deep in a scheduler, and the loser's weights left as they were."""
    weights = [p.detach().clone() for p in loser.module.parameters()]
    with pytest.raises(RuntimeError, match=message):
        loser.load_training_state(through_the_wire(donor.training_state()), model_in_place=False)
    assert all(torch.equal(a, b) for a, b in zip(weights, loser.module.parameters(), strict=True))
