"""PBTReplay: a recorded schedule applied at its recorded global steps, in a plain one-process run."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pbt.algorithm.lineage import LineageRecord, LineageWriter
from lightning_pbt.plugin.replay import PBTReplay, load_schedule
from lightning_pbt.tools.report import make_report

SCHEDULE = [(0, {"lr": 0.1, "dropout": 0.0}), (3, {"lr": 0.01, "dropout": 0.3}), (7, {"lr": 0.05, "dropout": 0.3})]


class Net(pl.LightningModule):
    def __init__(self, dropout: float = 0.5, step_lr: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Dropout(dropout), nn.Linear(8, 2))
        self.seen: list[tuple[int, float, float, float]] = []  # (global step, lr, dropout p, hparams.dropout)

    def on_pbt_hyperparameters(self, values):
        if "dropout" in values:
            self.body[1].p = values["dropout"]

    def training_step(self, batch, batch_idx):
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.seen.append((self.global_step, lr, self.body[1].p, self.hparams.dropout))
        x, y = batch
        return nn.functional.cross_entropy(self.body(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=1.0)
        if self.hparams.step_lr:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt


def fit(replay: PBTReplay, steps: int = 10, **model_kwargs) -> Net:
    g = torch.Generator().manual_seed(0)
    data = DataLoader(
        TensorDataset(torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g)), batch_size=4
    )
    model = Net(**model_kwargs)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        callbacks=[replay],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    return model


def expected(step: int) -> dict:
    return [values for start, values in SCHEDULE if start <= step][-1]


def test_schedule_applied_at_the_recorded_steps():
    replay = PBTReplay(SCHEDULE)
    model = fit(replay)
    assert [s for s, *_ in model.seen] == list(range(10))
    for step, lr, p, hparam in model.seen:
        assert lr == pytest.approx(expected(step)["lr"]), step
        assert p == hparam == expected(step)["dropout"], step
    assert [step for step, _ in replay.applied] == [0, 3, 7]


def test_lr_scheduler_keeps_its_shape_around_the_replayed_base():
    model = fit(PBTReplay([(0, {"lr": 0.1}), (6, {"lr": 0.2})]), steps=12, step_lr=True)
    for step, lr, *_ in model.seen:
        base = 0.1 if step < 6 else 0.2
        assert lr == pytest.approx(base * 0.5 ** (step // 4)), step


def test_schedule_from_schedule_json_and_from_lineage(tmp_path):
    records = [
        LineageRecord(0, 0, 0, None, "init", 0, {"lr": 0.1, "dropout": 0.0}),
        LineageRecord(0, 0, 1, None, "init", 1, {"lr": 0.01, "dropout": 0.3}),
        LineageRecord(3, 1, 0, 0.9, "keep", 0, {"lr": 0.1, "dropout": 0.0}),
        LineageRecord(3, 1, 1, 0.5, "exploit", 0, {"lr": 0.01, "dropout": 0.3}),
        LineageRecord(7, 2, 0, 0.6, "exploit", 1, {"lr": 0.05, "dropout": 0.3}),
        LineageRecord(7, 2, 1, 0.95, "keep", 1, {"lr": 0.01, "dropout": 0.3}),
    ]
    with LineageWriter(tmp_path / "pbt" / "lineage.jsonl") as writer:
        writer.write(records)
    # Member 0's final weights: its own until step 3, member 1's (who copied 0 at 3) from step 7 on.
    assert load_schedule(tmp_path, member=0) == SCHEDULE
    assert load_schedule(tmp_path / "pbt" / "lineage.jsonl", mode="min") == SCHEDULE  # best under min: 0
    report = make_report(tmp_path, mode="min", plots=False)
    assert load_schedule(report.files["schedule"]) == SCHEDULE
    model = fit(PBTReplay(str(report.files["schedule"])))
    assert [lr for _, lr, *_ in model.seen] == pytest.approx([expected(s)["lr"] for s in range(10)])


def test_resumed_run_starts_with_the_entry_in_effect():
    replay = PBTReplay([(0, {"lr": 0.1}), (3, {"lr": 0.01}), (50, {"lr": 0.05})])

    # A run starting at step 5 (as after a resume) applies the step-3 entry at once.
    class Fake:
        global_step, optimizers, lr_scheduler_configs, loggers = 5, [], [], []

    module = nn.Module()
    replay.on_train_start(Fake(), module)  # type: ignore[arg-type]
    assert replay.applied == [(5, {"lr": 0.01})]


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ([], "the schedule is empty"),
        ([(0, {"lr": 0.1}), (0, {"lr": 0.2})], r"several entries for step\(s\) \[0\]"),
        ([(-1, {"lr": 0.1})], "step must be an integer >= 0"),
        ([(0, 0.1)], "hyperparameters must be a mapping"),
        ("{not json", "not valid JSON"),
    ],
)
def test_malformed_schedules_are_rejected(schedule, message, tmp_path):
    if isinstance(schedule, str):
        path = tmp_path / "schedule.json"
        path.write_text(schedule)
        schedule = str(path)
    with pytest.raises(ValueError, match=message):
        PBTReplay(schedule)


def test_unknown_name_is_an_error_at_fit_start():
    with pytest.raises(ValueError, match=r"\['momentum_typo'\]"):
        fit(PBTReplay([(0, {"momentum_typo": 0.9})]))


def test_schedule_json_written_by_hand(tmp_path):
    path = tmp_path / "s.json"
    entries = [{"step": 7, "hyperparameters": {"lr": 0.05}}, {"step": 0, "hyperparameters": {"lr": 1}}]
    path.write_text(json.dumps(entries))
    assert load_schedule(path) == [(0, {"lr": 1}), (7, {"lr": 0.05})]


class Gan(pl.LightningModule):
    """Manual optimisation with two optimizers: the discriminator starts at half the generator's rate."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.generator, self.discriminator = nn.Linear(4, 4), nn.Linear(4, 1)
        self.seen: list[tuple[int, float, float]] = []  # (global step, generator lr, discriminator lr)

    def training_step(self, batch, batch_idx):
        g_opt, d_opt = self.optimizers()
        self.seen.append((self.global_step, g_opt.param_groups[0]["lr"], d_opt.param_groups[0]["lr"]))
        x, _ = batch
        d_loss = self.discriminator(self.generator(x).detach()).mean() - self.discriminator(x).mean()
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        g_loss = -self.discriminator(self.generator(x)).mean()
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()

    def configure_optimizers(self):
        return [
            torch.optim.Adam(self.generator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
            torch.optim.Adam(self.discriminator.parameters(), lr=1e-4, betas=(0.5, 0.999)),
        ]


def test_two_optimizers_keep_their_ratio_to_the_first_under_manual_optimisation():
    """The ratios are taken at fit start, before the first value is applied, across both optimizers."""
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.zeros(32)), batch_size=4)
    model = Gan()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=16,
        callbacks=[PBTReplay([(0, {"lr": 0.01}), (8, {"lr": 0.02})])],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    assert len(model.seen) == 8
    for step, g_lr, d_lr in model.seen:
        base = 0.01 if step < 8 else 0.02
        assert (g_lr, d_lr) == pytest.approx((base, base / 2)), step
