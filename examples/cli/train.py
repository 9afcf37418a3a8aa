"""LightningCLI + PBT: the strategy, the callback and its search space come from ``config.yaml``.

    python examples/cli/train.py fit --config examples/cli/config.yaml
    python examples/cli/train.py fit --config examples/cli/config.yaml --trainer.max_epochs=8 \
        --trainer.callbacks.init_args.hyperparameters.lr.init_args.high=0.5 \
        --trainer.callbacks.init_args.hyperparameters.momentum='{type: uniform, low: 0.5, high: 0.99}'

The model and data are ordinary ``lightning.pytorch`` code. What PBT needs from them: the network is
built in ``configure_model`` (after the strategy seeded each member differently) and ``dropout``, which
is not an optimizer setting, reaches the model through ``on_pbt_hyperparameters``.
"""

from __future__ import annotations

import lightning.pytorch as L
import torch
from lightning.pytorch.cli import LightningCLI
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DigitsClassifier(L.LightningModule):
    """A small MLP; ``lr``/``weight_decay`` reach the optimizer, ``dropout`` the hook below."""

    def __init__(self, hidden: int = 64, lr: float = 0.05, weight_decay: float = 1e-4, dropout: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.net: nn.Sequential | None = None

    def configure_model(self) -> None:
        # Built here rather than in __init__: the strategy seeds each member differently just before
        # configure_model, so the members start from different weights.
        if self.net is None:
            hidden, dropout = self.hparams.hidden, self.hparams.dropout
            self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10))

    def on_pbt_hyperparameters(self, values: dict) -> None:
        # PBT calls this with the hyperparameters that are not optimizer keys (here: dropout).
        self.net[2].p = values["dropout"]

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        acc = (self.net(x).argmax(-1) == y).float().mean()
        self.log("val_acc", acc, sync_dist=True, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay
        )


class DigitsData(L.LightningDataModule):
    """scikit-learn's 8x8 digits (shipped with scikit-learn, no download): a fixed train/val split."""

    def __init__(self, batch_size: int = 64, val_size: int = 500):
        super().__init__()
        self.batch_size = batch_size
        self.val_size = val_size

    def setup(self, stage: str) -> None:
        x, y = load_digits(return_X_y=True)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        x = torch.tensor(x / 16.0, dtype=torch.float32)[order]
        y = torch.tensor(y)[order]
        self.train_set = TensorDataset(x[self.val_size :], y[self.val_size :])
        self.val_set = TensorDataset(x[: self.val_size], y[: self.val_size])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.val_size)


def main() -> None:
    cli = LightningCLI(DigitsClassifier, DigitsData)
    strategy = cli.trainer.strategy
    if cli.subcommand == "fit" and strategy.world_rank == 0:  # population rank 0 holds the lineage
        run_dir = strategy.run_dir
        print(f"Lineage: {run_dir}/pbt/lineage.jsonl\nReport:  python -m lightning_pbt.report {run_dir}")


if __name__ == "__main__":
    main()
