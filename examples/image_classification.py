"""Image classification: PBT of a small CNN on scikit-learn's 8x8 digit images, on CPU.

    python examples/image_classification.py                     # 4 members, ~2 minutes on 2 cores
    python examples/image_classification.py pbt.hyperparameters.augment.high=0.5 trainer.max_epochs=60
    python examples/image_classification.py trainer=gpu_node model.channels=64 data.batch_size=256

A Hydra app over ``configs/image_classification.yaml``. Searched: learning rate and weight decay (SGD
param-group keys, set on the optimizer by PBT), label smoothing and augmentation strength (read from
``self.hparams`` at every step, so PBT's new values act at once). Score: validation accuracy; the best
member's accuracy on a held-out test split (never seen by PBT) is printed at the end.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_pbt.tools.hydra_configs import build_callback, build_strategy, check_population, register_configs

register_configs()
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def random_affine(images: torch.Tensor, strength: float) -> torch.Tensor:
    """Random rotation (up to 30 degrees), scale (+-20 %) and shift (up to 2 of 8 pixels), times ``strength``."""
    if strength <= 0:
        return images
    n = images.shape[0]
    angle = (torch.rand(n, device=images.device) * 2 - 1) * math.radians(30) * strength
    scale = 1 + (torch.rand(n, device=images.device) * 2 - 1) * 0.2 * strength
    shift = (torch.rand(n, 2, device=images.device) * 2 - 1) * 0.5 * strength  # grid units: 0.5 = 2 pixels
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


class SmallCNN(pl.LightningModule):
    def __init__(self, channels: int = 32, dropout: float = 0.1, lr: float = 0.05, weight_decay: float = 5e-4,
                 momentum: float = 0.9, label_smoothing: float = 0.0, augment: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()  # PBT writes label_smoothing / augment into self.hparams
        self.net: nn.Sequential | None = None

    def configure_model(self) -> None:
        # Built here, not in __init__: the strategy seeds each member (seed + member id) before this hook.
        if self.net is not None:
            return
        c = self.hparams.channels

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.net = nn.Sequential(
            *block(1, c), *block(c, c), nn.MaxPool2d(2),            # 8x8 -> 4x4
            *block(c, 2 * c), *block(2 * c, 2 * c), nn.MaxPool2d(2),  # 4x4 -> 2x2
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(self.hparams.dropout), nn.Linear(2 * c, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.net is not None, "configure_model() builds the network"
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        x = random_affine(x, float(self.hparams.augment))
        loss = F.cross_entropy(self(x), y, label_smoothing=float(self.hparams.label_smoothing))
        self.log("train_loss", loss)
        return loss

    def _evaluate(self, batch: Any, stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}_acc", (logits.argmax(-1) == y).float().mean(), sync_dist=True, prog_bar=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum,
                               weight_decay=self.hparams.weight_decay, nesterov=True)


class DigitImages(pl.LightningDataModule):
    """scikit-learn's 1797 digits as 1x8x8 images; one stratified train/validation/test split for all."""

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, test_fraction: float = 0.2,
                 train_size: int | None = None, split_seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        h = self.hparams
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
        y = torch.tensor(y, dtype=torch.long)
        x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=h.test_fraction, stratify=y,
                                                          random_state=h.split_seed)
        val_share = h.val_fraction / (1 - h.test_fraction)
        x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=val_share, stratify=y_rest,
                                                          random_state=h.split_seed)
        if h.train_size is not None:  # a smaller training set: a harder task, where regularisation matters
            x_train, y_train = x_train[: h.train_size], y_train[: h.train_size]
        self.train_set = TensorDataset(x_train, y_train)
        self.val_set = TensorDataset(x_val, y_val)
        self.test_set = TensorDataset(x_test, y_test)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1024)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=1024)


def build(cfg: DictConfig) -> tuple[SmallCNN, DigitImages]:
    return SmallCNN(**OmegaConf.to_container(cfg.model, resolve=True)), \
        DigitImages(**OmegaConf.to_container(cfg.data, resolve=True))


@hydra.main(config_path=CONFIG_DIR, config_name="image_classification", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from lightning_pbt.tools.report import make_report

    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    try:  # every process validates before a Trainer exists: a bad override fails at once, everywhere
        callback = build_callback(cfg.pbt)
        strategy = build_strategy(cfg.strategy)
        check_population(
            cfg.trainer, strategy.member_size, strategy.processes_per_device, strategy.members_per_process
        )
    except ValueError as err:
        sys.exit(f"image_classification.py: invalid configuration: {err}")
    pl.seed_everything(cfg.seed, verbose=False)  # member i is then seeded seed + i by the strategy
    model, data = build(cfg)
    trainer = pl.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), strategy=strategy,
                         callbacks=[callback], default_root_dir=str(run_dir),
                         logger=pl.loggers.CSVLogger(str(run_dir), name="", version=""))
    trainer.fit(model, datamodule=data)
    scores = {m: s["score"] for m, s in callback.population.items() if s["score"] is not None}
    # The same on every rank; None when no ready step scored anyone (the callback warned why).
    best = (max if cfg.pbt.mode == "max" else min)(scores, key=scores.get) if scores else None
    # Trainer.test is not built for members that take turns (docs/concepts/turns.md): no held-out number then.
    if strategy.members_per_process > 1:
        test_acc = None
        if trainer.strategy.world_rank == 0 and best is not None:
            print(f"\nHeld-out: member {best} (val_acc {scores[best]:.4f}), not tested (members take turns)",
                  flush=True)
    else:  # every member measures itself on the test split (every rank takes part); the best one says so
        test_acc = trainer.test(model, datamodule=data, verbose=False)[0]["test_acc"]
        if trainer.strategy.member_id == best and trainer.is_global_zero:
            print(f"\nHeld-out: member {best} (val_acc {scores[best]:.4f}), test accuracy {test_acc:.4f}", flush=True)
    if trainer.strategy.world_rank == 0 and cfg.report:
        make_report(trainer.strategy.run_dir or run_dir, mode=cfg.pbt.mode, monitor=cfg.pbt.monitor)
        print(f"Outputs in {trainer.strategy.run_dir or run_dir}/ (pbt/lineage.jsonl, pbt/summary.md)")
    return test_acc


if __name__ == "__main__":
    main()
