"""Stress: one torchrun job runs three PBT fits back to back (reusing its processes), with a ready
step every 2 steps; each fit writes its own lineage. argv: out member_size steps."""

from __future__ import annotations

import os
import sys

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pbt import LogUniform, PopulationBasedTraining, PopulationStrategy

out, member_size, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self.layer(batch[0]), batch[1]), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


g = torch.Generator().manual_seed(0)
x = torch.randn(512, 4, generator=g)
data = TensorDataset(x, (x[:, 0] > 0).long())
for repetition in range(3):
    pbt = PopulationBasedTraining(
        {"lr": LogUniform(1e-3, 1.0)},
        monitor="val_loss",
        mode="min",
        every_n_train_steps=2,
        seed=repetition,
        dirpath=os.path.join(out, f"repetition_{repetition}"),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=int(os.environ["LOCAL_WORLD_SIZE"]),
        strategy=PopulationStrategy(member_size=member_size, timeout=60),  # adopts the groups
        max_steps=steps,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        callbacks=[pbt],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(Tiny(), DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=64))
