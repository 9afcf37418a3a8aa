"""An ordinary Lightning script as a new user writes it from the README: ``seed_everything``, the model
built before ``fit`` (so every member builds the same weights), 4 members under torchrun, no progress bar,
Lightning's default logger and checkpoint. argv[1]: a JSON object (``out``, ``monitor``, ``max_epochs``);
every rank writes ``rank_<world>.json`` into ``out`` with what the callback tells it after fit.
"""

from __future__ import annotations

import json
import os
import sys

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pbt import PopulationBasedTraining, PopulationStrategy
from lightning_pbt.space import LogUniform, Uniform


class Net(pl.LightningModule):
    def __init__(self, lr: float = 0.05, dropout: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 2))
        self.trained_with: dict[str, float] = {}

    def on_pbt_hyperparameters(self, values):
        self.body[2].p = values["dropout"]

    def on_train_batch_start(self, batch, batch_idx):  # the values this step trains with
        self.trained_with = {"lr": self.optimizers().param_groups[0]["lr"], "dropout": self.body[2].p}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.body(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.body(x).argmax(-1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def main(cfg: dict) -> None:
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    model = Net()
    pbt = PopulationBasedTraining(
        {"lr": LogUniform(1e-3, 0.5), "dropout": Uniform(0.0, 0.5)},
        monitor=cfg.get("monitor", "val_acc"), every_n_epochs=1,
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=4, strategy=PopulationStrategy(), max_epochs=cfg.get("max_epochs", 3),
        enable_progress_bar=False, default_root_dir=cfg["out"], callbacks=[pbt],
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True),
                DataLoader(TensorDataset(x, y), batch_size=64))
    with open(os.path.join(cfg["out"], f"rank_{trainer.strategy.world_rank}.json"), "w") as f:
        json.dump({
            "member": trainer.strategy.member_id,
            "best_member": pbt.best_member,
            "best_score": pbt.best_score,
            "best_checkpoint_path": pbt.best_checkpoint_path,
            "results": [vars(result) for result in pbt.results],
            "trained_with": model.trained_with,
            "log_dir": trainer.log_dir,
        }, f)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
