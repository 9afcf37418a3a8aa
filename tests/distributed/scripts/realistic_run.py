"""A population as a user would train it, recording what tests/distributed/test_realistic.py asserts on.

A model of a few MB, AdamW with two param groups (decayed weights; biases and norms without decay, at
half the learning rate), a per-step warm-up LR scheduler that each member steps at its own frequency
(so that donors and losers sit at different scheduler positions even in lockstep), bf16-mixed on CPU,
gradient accumulation and clipping, member 1 slower than member 0, and a weight average beside PBT
(``EMAWeightAveraging`` or ``StochasticWeightAveraging``). Scored on a constant per member (member 1
always better), so member 0 copies member 1 at every ready step where it can.

Configured by a JSON object in argv[1]; every rank writes ``rank_<world>.json`` into ``out``: digests of
its training state just before and just after each ready step.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging, StochasticWeightAveraging, WeightAveraging
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pbt import LogUniform, PopulationBasedTraining, PopulationStrategy, member_id_from_env

cfg = json.loads(sys.argv[1])
out = cfg["out"]
MEMBER = member_id_from_env(1)
WARMUP = 40


def digest(node) -> str:
    """One digest of a nest of tensors and plain values (bit-exact for tensors)."""
    h = hashlib.sha256()

    def walk(value):
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            h.update(str((value.dtype, tuple(value.shape))).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                h.update(str(key).encode())
                walk(value[key])
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)
        else:
            h.update(repr(value).encode())

    walk(node)
    return h.hexdigest()[:16]


def averaging_digest(trainer) -> str:
    """The weight average: its averaged weights and update count (for WeightAveraging its AveragedModel;
    for SWA its average model, count and live count), not the step or epoch of its last update."""
    (callback,) = [c for c in trainer.callbacks if isinstance(c, WeightAveraging | StochasticWeightAveraging)]
    if isinstance(callback, WeightAveraging):
        return digest(callback._average_model.state_dict())
    state = callback.state_dict()
    live = None if callback.n_averaged is None else int(callback.n_averaged)
    return digest([state["average_model_state"], state["n_averaged"], live])


def position(scheduler_state: dict) -> dict:
    return {k: v for k, v in scheduler_state.items() if k in ("last_epoch", "_step_count")}


def state_digest(trainer) -> dict:
    optimizer_state = [opt.state_dict()["state"] for opt in trainer.optimizers]
    return {
        "model": digest(trainer.lightning_module.state_dict()),
        "optimizer": digest(optimizer_state),
        # where each LR scheduler is (its lr values follow the hyperparameters, which explore changes)
        "schedulers": json.dumps([position(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs]),
        "averages": averaging_digest(trainer),
    }


class Net(pl.LightningModule):
    def __init__(self, lr: float = 1e-3):
        super().__init__()
        self.save_hyperparameters()
        # 128*768 + 768*768 + 768*10 weights: about 2.8 MB, the middle layer's 2.4 MB moves on the direct path
        self.body = nn.Sequential(
            nn.Linear(128, 768), nn.LayerNorm(768), nn.GELU(), nn.Linear(768, 768), nn.GELU(), nn.Linear(768, 10)
        )

    def training_step(self, batch, batch_idx):
        if MEMBER in cfg.get("slow_members", ()):
            time.sleep(cfg["slow_delay"])
        x, y = batch
        return nn.functional.cross_entropy(self.body(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.body(x), y), sync_dist=True)
        self.log("member_score", float(self.trainer.strategy.member_id), sync_dist=True)

    def configure_optimizers(self):
        decay = [p for n, p in self.named_parameters() if n.endswith("weight") and p.dim() > 1]
        rest = [p for n, p in self.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0, "lr": self.hparams.lr / 2}],
            lr=self.hparams.lr,
        )
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / WARMUP))
        # Member m steps its warm-up every m+1 optimizer steps (frequency counts batches, 2 per optimizer
        # step): members sit at different scheduler positions.
        schedule = {"scheduler": warmup, "interval": "step", "frequency": 2 * (1 + MEMBER)}
        return {"optimizer": opt, "lr_scheduler": schedule}


class Recorder(pl.Callback):
    def __init__(self):
        self.records: list[dict] = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.records.append({"step": trainer.global_step, **state_digest(trainer)})


g = torch.Generator().manual_seed(0)
x = torch.randn(256, 128, generator=g)  # 8 optimizer steps per epoch: batches of 16, 2 accumulated
y = (x[:, :10].argmax(-1) + (x[:, 10] > 1).long()) % 10
train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
val = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=64)

if cfg["average"] == "ema":
    average = EMAWeightAveraging(decay=0.9)
else:  # SWA from the second epoch on (it then replaces the warm-up by its SWALR, stepped per epoch)
    average = StochasticWeightAveraging(swa_lrs=1e-3, swa_epoch_start=2, annealing_epochs=1)
before, after = Recorder(), Recorder()
pbt = PopulationBasedTraining(
    {"lr": LogUniform(1e-4, 1e-2)},
    monitor="member_score",
    mode="max",
    every_n_train_steps=cfg["every"],
    quantile_fraction=0.5,
    synchronous=cfg["synchronous"],
    seed=1,
)
trainer = pl.Trainer(
    accelerator="cpu",
    devices=2,
    precision="bf16-mixed",
    strategy=PopulationStrategy(member_size=1, timeout=60),
    max_epochs=cfg["epochs"],
    accumulate_grad_batches=2,
    gradient_clip_val=1.0,
    val_check_interval=2 * cfg["every"],  # batches: a validation every `every` optimizer steps
    check_val_every_n_epoch=None,
    callbacks=[before, pbt, after, average],
    default_root_dir=out,
    logger=False,
    enable_checkpointing=False,
    enable_model_summary=False,
    enable_progress_bar=False,
)
pl.seed_everything(MEMBER, verbose=False)  # members start from weights of their own
model = Net()
trainer.fit(model, train, val)
with open(os.path.join(out, f"rank_{trainer.strategy.world_rank}.json"), "w") as f:
    json.dump(
        {
            "member": trainer.strategy.member_id,
            "global_step": trainer.global_step,
            "before": before.records,
            "after": after.records,
        },
        f,
    )
