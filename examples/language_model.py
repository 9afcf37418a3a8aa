"""Language modelling: PBT of a small byte-level transformer on the Python standard library's source.

    python examples/language_model.py                           # 16 members (4 processes x 4 taking turns)
    python examples/language_model.py strategy.members_per_process=1   # 4 members, tested on held-out files
    python examples/language_model.py model.n_layer=4 model.d_model=128 trainer.max_steps=5000
    python examples/language_model.py trainer=gpu_node strategy.members_per_process=1 data.num_files=null \
        model.d_model=384 model.n_layer=6

A Hydra app over ``configs/language_model.yaml``. The corpus is on every machine that runs this script:
the standard library's top-level ``*.py`` files, sorted by name and split BY FILE (every 10th file to
test, the next to validation, the rest to training), read as bytes (vocabulary 256: no tokenizer).
Searched: lr and weight decay (AdamW param-group keys), warm-up length and dropout (``self.hparams``).
Score: validation loss (mode min). The best member's perplexity on the held-out test files is printed when
each process hosts one member (``Trainer.test`` with members taking turns is not built).
The defaults (population 16, 300 steps) are the population-16 benchmark's, where PBT did best.
"""

from __future__ import annotations

import math
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_pbt.tools.hydra_configs import build_callback, build_strategy, check_population, register_configs

register_configs()
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def stdlib_split(num_files: int | None = None) -> dict[str, list[Path]]:
    """The standard library's top-level modules, sorted, split by file: a deterministic corpus."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:num_files]
    if len(files) < 10:
        raise ValueError(f"found only {len(files)} standard-library files; need at least 10")
    return {"test": files[0::10], "val": files[1::10], "train": [f for i, f in enumerate(files) if i % 10 > 1]}


def read_bytes(files: list[Path], limit: int | None = None) -> torch.Tensor:
    data = b"\n".join(f.read_bytes() for f in files)[:limit]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class Chunks(Dataset):
    """Consecutive ``block_size + 1`` byte windows (the last byte of one is the first of the next)."""

    def __init__(self, data: torch.Tensor, block_size: int) -> None:
        self.data, self.block_size = data, block_size

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.data[i * self.block_size : (i + 1) * self.block_size + 1]
        return window[:-1], window[1:]


class StdlibText(pl.LightningDataModule):
    def __init__(self, block_size: int = 64, batch_size: int = 32, num_files: int | None = 120,
                 eval_bytes: int | None = 65536) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        h = self.hparams
        split = stdlib_split(h.num_files)
        # Validation and test read the first eval_bytes of their files: the same text for every member.
        self.sets = {name: Chunks(read_bytes(files, None if name == "train" else h.eval_bytes), h.block_size)
                     for name, files in split.items()}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["train"], batch_size=self.hparams.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["val"], batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["test"], batch_size=256)


class CharTransformer(pl.LightningModule):
    """A GPT-style decoder (pre-norm, causal, tied embeddings) over bytes."""

    def __init__(self, block_size: int = 64, n_layer: int = 2, n_head: int = 4, d_model: int = 64,
                 dropout: float = 0.1, lr: float = 1e-3, weight_decay: float = 0.1, warmup_steps: int = 100,
                 min_lr_ratio: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()  # PBT writes dropout / warmup_steps into self.hparams
        self.embed: nn.Embedding | None = None

    def configure_model(self) -> None:
        if self.embed is not None:
            return
        h = self.hparams
        self.embed = nn.Embedding(256, h.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)  # GPT-2's init: tied output logits start near uniform
        self.position = nn.Parameter(torch.zeros(1, h.block_size, h.d_model))
        nn.init.normal_(self.position, std=0.02)
        self.drop = nn.Dropout(h.dropout)
        layer = nn.TransformerEncoderLayer(h.d_model, h.n_head, 4 * h.d_model, h.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, h.n_layer, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(h.d_model)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(h.block_size), persistent=False)

    def on_pbt_hyperparameters(self, values: dict[str, Any]) -> None:
        if "dropout" in values:  # every dropout of the network, attention's included
            for module in self.modules():
                if isinstance(module, nn.Dropout):
                    module.p = float(values["dropout"])
                elif isinstance(module, nn.MultiheadAttention):
                    module.dropout = float(values["dropout"])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.drop(self.embed(idx) + self.position[:, :t])
        x = self.blocks(x, mask=self.causal[:t, :t], is_causal=True)
        return self.norm(x) @ self.embed.weight.T  # tied input and output embeddings

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), sync_dist=True, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch), sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self.log("test_perplexity", torch.exp(self.trainer.callback_metrics["test_loss"]), sync_dist=True)

    def configure_optimizers(self) -> Any:
        # Weight decay on matrices only (nanoGPT's rule); both groups start at the same lr, and PBT keeps
        # each group's ratio to the first group when it sets weight_decay (the second stays 0).
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=self.hparams.lr, betas=(0.9, 0.95))
        total = max(1, self.trainer.estimated_stepping_batches)

        def warmup_cosine(step: int) -> float:
            # Read at every step: a warm-up length PBT changes takes effect at once.
            warmup = max(1, int(self.hparams.warmup_steps))
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            ratio = self.hparams.min_lr_ratio
            return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def build(cfg: DictConfig) -> tuple[CharTransformer, StdlibText]:
    return (CharTransformer(**OmegaConf.to_container(cfg.model, resolve=True)),
            StdlibText(**OmegaConf.to_container(cfg.data, resolve=True)))


@hydra.main(config_path=CONFIG_DIR, config_name="language_model", version_base="1.3")
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
        sys.exit(f"language_model.py: invalid configuration: {err}")
    pl.seed_everything(cfg.seed, verbose=False)
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
        perplexity = None
        if trainer.strategy.world_rank == 0 and best is not None:
            print(f"\nHeld-out: member {best} (val_loss {scores[best]:.4f}, perplexity {math.exp(scores[best]):.3f}), "
                  "not tested (members take turns)", flush=True)
    else:
        perplexity = trainer.test(model, datamodule=data, verbose=False)[0]["test_perplexity"]
        if trainer.strategy.member_id == best and trainer.is_global_zero:
            print(f"\nHeld-out: member {best} (val_loss {scores[best]:.4f}, perplexity {math.exp(scores[best]):.3f}), "
                  f"test perplexity {perplexity:.3f}", flush=True)
    if trainer.strategy.world_rank == 0 and cfg.report:
        make_report(trainer.strategy.run_dir or run_dir, mode=cfg.pbt.mode, monitor=cfg.pbt.monitor)
        print(f"Outputs in {trainer.strategy.run_dir or run_dir}/ (pbt/lineage.jsonl, pbt/summary.md)")
    return perplexity


if __name__ == "__main__":
    main()
