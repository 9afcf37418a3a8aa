"""An ordinary Lightning script turned into a PBT run: the lines marked ``# PBT`` are all that changed.

    python examples/existing_trainer.py                 # 4 processes = 4 members, on CPU
    python examples/existing_trainer.py --devices 2 --max-epochs 4

No Hydra, no config files: the callback takes the search space, the strategy splits the processes
into members. Lightning launches the processes itself (or run it under torchrun / srun).
"""

import argparse

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pbt import LogUniform, PopulationBasedTraining, PopulationStrategy, Uniform, member_id_from_env  # PBT


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 0.05, weight_decay: float = 1e-4, dropout: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(dropout), nn.Linear(128, 10))

    def on_pbt_hyperparameters(self, values):  # PBT: non-optimizer hyperparameters arrive here
        self.net[2].p = values["dropout"]

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        acc = (self.net(x).argmax(-1) == y).float().mean()
        self.log("val_acc", acc, sync_dist=True, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9,
                               weight_decay=self.hparams.weight_decay)


def loaders(batch_size: int = 32):
    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    x = torch.tensor(x / 16.0, dtype=torch.float32)[order]
    y = torch.tensor(y)[order]
    train = TensorDataset(x[500:], y[500:])
    val = TensorDataset(x[:500], y[:500])
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=500)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--max-epochs", type=int, default=8)
    parser.add_argument("--root-dir", default="lightning_logs/existing_trainer")
    args = parser.parse_args()

    pl.seed_everything(0)
    # Built before fit, so seed each member's weights differently (or build them in configure_model).
    torch.manual_seed(1000 + member_id_from_env())  # PBT
    model = Classifier()
    train, val = loaders()
    pbt = PopulationBasedTraining(  # PBT: the search space, the score and how often to exploit
        hyperparameters={"lr": LogUniform(1e-3, 0.3), "weight_decay": LogUniform(1e-6, 1e-2),
                         "dropout": Uniform(0.0, 0.5)},
        monitor="val_acc", mode="max", every_n_epochs=2,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=PopulationStrategy(member_size=1),  # PBT: devices / member_size members
        callbacks=[pbt],  # PBT
        max_epochs=args.max_epochs,
        default_root_dir=args.root_dir,
        enable_model_summary=False,
    )
    trainer.fit(model, train, val)
    if trainer.strategy.world_rank == 0:  # PBT: population rank 0 has the lineage
        print(f"lineage: {pbt.lineage_path}\nreport:  python -m lightning_pbt.report {trainer.strategy.run_dir}")
