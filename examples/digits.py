"""The main job: Population Based Training of a small MLP on scikit-learn's digits, on CPU.

    python examples/digits.py                                   # 4 members (trainer.devices=4), ~1 minute
    python examples/digits.py pbt.hyperparameters.lr.high=0.5 '~pbt.hyperparameters.dropout'
    torchrun --standalone --nproc_per_node=4 examples/digits.py  # the same run, launched by torchrun

A Hydra app over ``configs/digits.yaml``: ``trainer.*`` are Trainer arguments, ``strategy.*`` the
PopulationStrategy's, ``pbt.*`` the PopulationBasedTraining callback's and ``pbt.hyperparameters.*``
the search space. Every process validates the config before a Trainer exists, so a bad override fails
at once, everywhere. At the end population rank 0 prints the population, writes plots, a summary and
the best member's ``schedule.json`` (``python -m lightning_pbt.report RUN_DIR`` does it again); the
callback itself prints the population at the end of fit.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pbt.tools.hydra_configs import build_callback, build_strategy, check_population, register_configs

register_configs()  # the schema configs (pbt/base_pbt, strategy/base_population) and ${pbt_run_id:}

# torch 2.13 deprecates a pytree class that Lightning 2.6 still checks for, once per rank: not our business.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


class DigitsMLP(pl.LightningModule):
    def __init__(self, hidden_sizes: list[int], dropout: float, lr: float, weight_decay: float,
                 momentum: float) -> None:
        super().__init__()
        self.save_hyperparameters()  # PBT writes non-optimizer values (dropout) into self.hparams
        self.net: nn.Sequential | None = None

    def configure_model(self) -> None:
        # Built here, not in __init__: the strategy seeds every member differently (seed + member id)
        # just before configure_model, so members start from different weights.
        if self.net is not None:
            return
        layers: list[nn.Module] = []
        width = 64
        for hidden in self.hparams.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(self.hparams.dropout)]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, 10))

    def on_pbt_hyperparameters(self, values: dict[str, Any]) -> None:
        # PBT calls this with the non-optimizer hyperparameters (here: dropout) whenever they change.
        if "dropout" in values and self.net is not None:
            for module in self.net.modules():
                if isinstance(module, nn.Dropout):
                    module.p = float(values["dropout"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.net is not None, "configure_model() builds the network"
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), sync_dist=True, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # lr, weight_decay and momentum are param-group keys: PBT sets them on the optimizer directly.
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum,
                               weight_decay=self.hparams.weight_decay)


class DigitsData(pl.LightningDataModule):
    """scikit-learn's 8x8 digits (shipped with the package), one fixed train/validation split."""

    def __init__(self, batch_size: int, val_fraction: float, split_seed: int) -> None:
        super().__init__()
        self.batch_size, self.val_fraction, self.split_seed = batch_size, val_fraction, split_seed

    def setup(self, stage: str) -> None:
        x, y = load_digits(return_X_y=True)
        order = np.random.default_rng(self.split_seed).permutation(len(y))  # the same split in every member
        x = torch.tensor(x[order] / 16.0, dtype=torch.float32)
        y = torch.tensor(y[order], dtype=torch.long)
        n_val = round(len(y) * self.val_fraction)
        self.train_set = TensorDataset(x[n_val:], y[n_val:])
        self.val_set = TensorDataset(x[:n_val], y[:n_val])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1024)


def print_outputs(cfg: DictConfig, run_dir: Path, callback: Any) -> float | None:
    """Population rank 0, after the callback printed the population: where everything is, and the plots;
    the best score (every rank knows it: ``callback.best_score``)."""
    from lightning_pbt.tools.report import make_report

    report = make_report(run_dir, mode=cfg.pbt.mode, monitor=cfg.pbt.monitor) if cfg.report else None
    print(f"\nOutputs in {run_dir}/")
    print(f"  lineage          {run_dir}/pbt/lineage.jsonl")
    print(f"  results          {run_dir}/pbt/results.json (python -m lightning_pbt best {run_dir})")
    print(f"  member logs      {run_dir}/member_<id>/ (metrics.csv, checkpoints/)")
    print(f"  Hydra config     {run_dir}/.hydra/config.yaml")
    if report is not None:
        for name, path in report.files.items():
            print(f"  {name:<16} {path}")
    print(f"Report again with: python -m lightning_pbt.report {run_dir}")
    return callback.best_score


def replay(cfg: DictConfig, run_dir: Path) -> float | None:
    """Re-train one model, in one process and without the population, with a schedule PBT found."""
    from lightning_pbt.plugin.replay import PBTReplay

    try:
        callback = PBTReplay(cfg.replay, mode=cfg.pbt.mode)
    except (OSError, ValueError) as err:
        sys.exit(f"digits.py: replay={cfg.replay}: {err}")
    pl.seed_everything(cfg.seed, verbose=False)
    trainer_args = {**OmegaConf.to_container(cfg.trainer, resolve=True), "devices": 1, "num_nodes": 1}
    trainer = pl.Trainer(**trainer_args, callbacks=[callback], default_root_dir=str(run_dir),
                         logger=pl.loggers.CSVLogger(str(run_dir), name="replay", version=""))
    trainer.fit(DigitsMLP(**OmegaConf.to_container(cfg.model, resolve=True)),
                datamodule=DigitsData(**OmegaConf.to_container(cfg.data, resolve=True)))
    score = trainer.callback_metrics.get(cfg.pbt.monitor)
    pbt = "" if callback.pbt_score is None else (
        f" (PBT's member {callback.pbt_member} reached {callback.pbt_score:.4g} with this schedule)")
    print(f"\nReplayed {len(callback.schedule)} schedule entries (changes at steps "
          f"{[step for step, _ in callback.applied]}); final {cfg.pbt.monitor}: "
          f"{'n/a' if score is None else f'{float(score):.4g}'}{pbt}\nOutputs in {run_dir}/")
    return None if score is None else float(score)


@hydra.main(config_path=CONFIG_DIR, config_name="digits", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    if cfg.get("replay"):
        return replay(cfg, run_dir)

    # 1. Validate everything before a Trainer (and its processes) exists: a malformed search space from
    #    the command line fails here with the key's name, in every process.
    try:
        callback = build_callback(cfg.pbt)
        strategy = build_strategy(cfg.strategy)
        check_population(
            cfg.trainer, strategy.member_size, strategy.processes_per_device, strategy.members_per_process
        )
    except ValueError as err:
        sys.exit(f"digits.py: invalid configuration: {err}")

    # 2. Build and train.
    pl.seed_everything(cfg.seed, verbose=False)  # member i is then seeded seed + i by the strategy
    model = DigitsMLP(**OmegaConf.to_container(cfg.model, resolve=True))
    data = DigitsData(**OmegaConf.to_container(cfg.data, resolve=True))
    trainer = pl.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        strategy=strategy,
        callbacks=[callback],
        default_root_dir=str(run_dir),
        # The strategy moves the logger into <run_dir>/member_<id>/ (metrics.csv, checkpoints/).
        logger=pl.loggers.CSVLogger(str(run_dir), name="", version=""),
    )
    trainer.fit(model, datamodule=data)

    # 3. The callback printed the population at the end of fit; population rank 0 says where everything is
    #    (the strategy chose its run_dir for every process).
    if trainer.strategy.world_rank != 0:
        return None
    return print_outputs(cfg, Path(trainer.strategy.run_dir or run_dir), callback)


if __name__ == "__main__":
    main()
