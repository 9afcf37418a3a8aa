"""A small lockstep PBT run whose members may take turns (``members_per_process``), recording per member
what the turns tests compare between layouts.

Launched by Lightning's own launcher (it re-executes this file). Configured by a JSON object in argv[1]:
``out``, ``devices``, ``member_size``, ``members_per_process``, ``max_epochs``, and either
``every_n_epochs`` or ``every_n_train_steps`` (with ``val_check_interval``); ``stop_member`` stops one
member early (EarlyStopping). ``resume``: ``fit(ckpt_path="last")`` with every checkpoint kept;
``kill_before_save`` (``{"member", "step"}``, under torchrun): on the first attempt that member's process
dies (SIGKILL) while the member saves its checkpoint of that step, once member 0 has saved its own.
``park_stand_in``: members waiting for their turn are parked in fresh CPU storage (the stand-in, on this
GPU-less machine, for leaving a GPU for pinned host memory), so every hand-over copies their tensors.
Every member writes ``member_<id>.json`` into ``out``: its state digest after every validation end
(after the ready step's exploit), the hex of every training loss (they depend on the data order, the
weights and the dropout masks), and its final state.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pbt import PopulationBasedTraining, PopulationStrategy
from lightning_pbt.algorithm.topology import ParkingPlace
from lightning_pbt.plugin import parking
from lightning_pbt.space import LogUniform, Uniform

cfg = json.loads(sys.argv[1])
out = cfg["out"]
PARKED = [0]  # members parked in this process (with park_stand_in)


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def state_digest(trainer) -> dict:
    module = trainer.lightning_module
    opt_tensors = [
        v
        for opt in trainer.optimizers
        for s in opt.state_dict()["state"].values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    ]
    schedulers = [
        {k: v for k, v in config.scheduler.state_dict().items() if k in ("last_epoch", "_step_count", "step_size")}
        for config in trainer.lr_scheduler_configs
    ]
    return {
        "model": digest(module.state_dict().values()),
        "optimizer": digest(opt_tensors),
        "schedulers": schedulers,
        "lr": [group["lr"] for opt in trainer.optimizers for group in opt.param_groups],
        "dropout": module.body[2].p,
    }


def data(seed: int, n: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    y = (x[:, :4].sum(1) > 0).long()
    return TensorDataset(x, y)


class Net(pl.LightningModule):
    def __init__(self, lr: float = 0.01, dropout: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.body: nn.Sequential | None = None
        self.losses: list[str] = []

    def configure_model(self) -> None:
        if self.body is None:  # built after the strategy seeded the member: weights differ per member
            self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(self.hparams.dropout), nn.Linear(16, 2))

    def on_pbt_hyperparameters(self, values):
        self.body[2].p = values["dropout"]

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.body(x), y)
        self.losses.append(float(loss.detach()).hex())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.body(x)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), sync_dist=True)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        member = self.trainer.strategy.member_id
        self.log("member_const", float(member), sync_dist=True)
        # Never improves for the member that is to stop early; improves at every validation for the others.
        stopper = 0.0 if member == cfg.get("stop_member") else -float(self.global_step)
        self.log("stopper", stopper, sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        # Every member's schedule differs (step_size), so an exploit that forgot the scheduler would show.
        step_size = 2 + self.trainer.strategy.member_id
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class KillBetweenSaves(pl.Callback):
    """SIGKILL this process while member ``kill_before_save["member"]`` saves its checkpoint of step
    ``kill_before_save["step"]``, once member 0 saved its own: a crash between two members' saves of one
    ready step, the members before it in the same process saved, those after it not."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        when = cfg["kill_before_save"]
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if not first_attempt or (trainer.strategy.member_id, trainer.global_step) != (when["member"], when["step"]):
            return
        last = os.path.join(out, "ckpt", "member_0", "last.ckpt")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if torch.load(last, map_location="cpu", weights_only=True)["global_step"] == when["step"]:
                    break
            except Exception:  # not there yet, or being written
                pass
            time.sleep(0.05)
        os.kill(os.getpid(), 9)


def pbt_of(trainer) -> PopulationBasedTraining:
    return next(cb for cb in trainer.callbacks if isinstance(cb, PopulationBasedTraining))


class Recorder(pl.Callback):
    """After the PBT callback: each member's state at every validation end, and its end state."""

    def __init__(self) -> None:
        self.at_validation: list[dict] = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.at_validation.append({"step": trainer.global_step, **state_digest(trainer)})

    def teardown(self, trainer, pl_module, stage):
        strategy = trainer.strategy
        if stage != "fit" or strategy.global_rank != 0:
            return
        record = {
            "member": strategy.member_id,
            "world_rank": strategy.world_rank,
            "global_step": trainer.global_step,
            "at_validation": self.at_validation,
            "losses": pl_module.losses,
            "final": state_digest(trainer),
            "log_dir": trainer.loggers[0].log_dir if trainer.loggers else None,
            "checkpoint_dir": next((cb.dirpath for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)), None),
            # EarlyStopping's stopped_epoch stays 0 for a stop in epoch 0: its wait count says it stopped
            "stopped_early": any(
                isinstance(cb, EarlyStopping) and cb.wait_count >= cb.patience for cb in trainer.callbacks
            ),
            "thread": threading.current_thread().name,
            "parked": PARKED[0],
            # What this member's own callback tells after fit (each member that takes turns has its own copy).
            "results": [vars(result) for result in pbt_of(trainer).results],
            "best_member": pbt_of(trainer).best_member,
        }
        with open(os.path.join(out, f"member_{strategy.member_id}.json"), "w") as f:
            json.dump(record, f)


def main() -> None:
    if cfg.get("park_stand_in"):

        def stand_in(device_type: str, keep_on_device: bool = False) -> ParkingPlace:
            PARKED[0] += 1
            return ParkingPlace(device="cpu")

        parking.parking_place = stand_in
    interval = (
        {"every_n_train_steps": cfg["every_n_train_steps"]}
        if cfg.get("every_n_train_steps")
        else {"every_n_epochs": cfg.get("every_n_epochs", 1)}
    )
    pbt = PopulationBasedTraining(
        hyperparameters={"lr": LogUniform(1e-3, 1e-1), "dropout": Uniform(0.0, 0.5)},
        monitor="val_acc",
        mode="max",
        quantile_fraction=0.25,
        seed=cfg.get("seed", 0),
        **interval,
    )
    checkpoints = (
        ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), save_top_k=-1, save_last=True)  # scoped per member
        if cfg.get("resume")
        else ModelCheckpoint(monitor="val_loss", save_top_k=1, save_last=True)
    )
    callbacks = [pbt, Recorder(), checkpoints]
    if cfg.get("kill_before_save"):
        callbacks.append(KillBetweenSaves())
    if cfg.get("stop_member") is not None:
        callbacks.append(EarlyStopping(monitor="stopper", mode="min", patience=cfg.get("patience", 1)))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=cfg["devices"],
        strategy=PopulationStrategy(
            member_size=cfg.get("member_size", 1), members_per_process=cfg.get("members_per_process", 1), timeout=180
        ),
        callbacks=callbacks,
        logger=CSVLogger(out, name="logs"),
        default_root_dir=out,
        max_epochs=cfg["max_epochs"],
        val_check_interval=cfg.get("val_check_interval"),
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    train = DataLoader(data(1, cfg.get("train_size", 96)), batch_size=8, shuffle=True)
    val = DataLoader(data(2, 64), batch_size=32)
    trainer.fit(Net(), train, val, ckpt_path="last" if cfg.get("resume") else None)


if __name__ == "__main__":
    pl.seed_everything(cfg.get("seed", 0), verbose=False)
    main()
