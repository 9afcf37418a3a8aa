"""A tiny PBT run that records what the distributed tests assert on.

Launched as a subprocess (Lightning's launcher re-executes this file, or torchrun runs it). The run
is configured by a JSON object in argv[1]; every rank writes ``rank_<world>.json`` into ``out``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pbt.algorithm.space import LogUniform, Uniform
from lightning_pbt.algorithm.space_config import space_from_config

cfg = json.loads(sys.argv[1])
out = cfg["out"]
if cfg.get("flavour") == "lightning":  # the unified package: `import lightning.pytorch as pl`
    import lightning.pytorch as pl

    from lightning_pbt.lightning import PopulationBasedTraining, PopulationStrategy, member_id_from_env
else:
    import pytorch_lightning as pl

    from lightning_pbt import PopulationBasedTraining, PopulationStrategy, member_id_from_env
MEMBER = member_id_from_env(cfg["member_size"])


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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
    # Where each LR scheduler is (its lr values follow the hyperparameters, which explore changes).
    schedulers = [
        {k: v for k, v in config.scheduler.state_dict().items() if k in ("last_epoch", "_step_count")}
        for config in trainer.lr_scheduler_configs
    ]
    return {
        "model": digest(module.state_dict().values()),
        "optimizer": digest(opt_tensors),
        "schedulers": hashlib.sha256(json.dumps(schedulers, sort_keys=True, default=str).encode()).hexdigest()[:16],
        # the precision plugin's state: the GradScaler's scale and growth tracker under 16-mixed
        "precision": json.dumps(trainer.precision_plugin.state_dict(), sort_keys=True, default=float),
    }


def submodule_digests(trainer, names=("body.0", "body.3")) -> dict:
    """Per submodule: its weights, and its parameters' optimizer state (None when they have none)."""
    modules = dict(trainer.lightning_module.named_modules())
    opt = trainer.optimizers[0]
    out = {}
    for name in names:
        params = list(modules[name].parameters())
        state = [v for p in params for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
        out[name] = {"weights": digest(params), "optimizer": digest(state) if state else None}
    return out


class Net(pl.LightningModule):
    def __init__(self, lr: float = 0.05, dropout: float = 0.1, weight_decay: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 2))
        self.seen_dropout: list[float] = []
        # Synchronises over the default group, which the strategy makes the member's group.
        self.rank_mean = torchmetrics.MeanMetric()
        self.train_samples = 0
        self.first_epoch_indices: list[int] = []

    def _diverged(self) -> bool:
        member = self.trainer.strategy.member_id
        return (cfg.get("nan_all") or cfg.get("nan_member") == member) and self.global_step >= cfg.get("nan_from", 0)

    def on_pbt_hyperparameters(self, values):
        self.body[2].p = values["dropout"]
        self.seen_dropout.append(values["dropout"])

    def training_step(self, batch, batch_idx):
        if MEMBER in cfg.get("slow_members", ()):  # a slower device: same work, more time per step
            time.sleep(cfg["slow_delay"])
        time.sleep(cfg.get("member_delays", {}).get(str(MEMBER), 0.0))  # seconds per step, per member
        x, y, index = batch
        self.train_samples += len(x)
        if self.current_epoch == 0:
            self.first_epoch_indices.extend(index.tolist())
        loss = nn.functional.cross_entropy(self.body(x), y)
        if self._diverged():
            loss = loss * float("nan")
        self.log("train_loss", loss, sync_dist=True)
        self.log("rank_value", float(self.trainer.strategy.world_rank), sync_dist=True, on_step=True)
        self.rank_mean.update(float(self.trainer.strategy.world_rank))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        acc = (self.body(x).argmax(-1) == y).float().mean()
        loss = nn.functional.cross_entropy(self.body(x), y)
        if self._diverged():
            loss = loss * float("nan")
            acc = acc * float("nan")
        if cfg.get("no_metric"):
            return
        self.log("val_acc", acc, sync_dist=True)
        self.log("member_const", float(self.trainer.strategy.member_id), sync_dist=True)  # never improves
        self.log("flat", 0.0, sync_dist=True)  # the same for every member: never improves, nobody exploits
        self.log("val_loss", loss, sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay
        )
        if cfg.get("lr_scheduler") == "step":
            return {
                "optimizer": opt,
                "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
            }
        if cfg.get("lr_scheduler") == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["max_steps"])
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt


class Recorder(pl.Callback):
    """Digests of the training state just before and just after each PBT ready step."""

    def __init__(self, when: str):
        self.when = when
        self.records: list[dict] = []
        self.batches: list[dict] = []  # with snapshot_every: the state after every optimizer step
        self.initial: dict | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if cfg.get("snapshot_every") and self.when == "before":
            self.batches.append({"step": trainer.global_step, **state_digest(trainer)})

    def on_train_start(self, trainer, pl_module):
        self.initial = state_digest(trainer)

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        opt = trainer.optimizers[0]
        self.records.append(
            {
                "step": trainer.global_step,
                **state_digest(trainer),
                "submodules": submodule_digests(trainer),
                "lr": opt.param_groups[0]["lr"],
                "dropout": pl_module.body[2].p,
                "hparams_dropout": pl_module.hparams.dropout,
            }
        )


g = torch.Generator().manual_seed(0)
x = torch.randn(256, 8, generator=g)
y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
train = DataLoader(TensorDataset(x, y, torch.arange(len(x))), batch_size=16, shuffle=True)
val = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)

class Gather(pl.Callback):
    """Member-scoped collectives at the end of training, before Lightning's teardown moves the module to
    the CPU (an NCCL member group could not gather CPU tensors after it)."""

    def __init__(self):
        self.results: dict = {}

    def on_train_end(self, trainer, pl_module):
        self.results = {
            "gathered": len(pl_module.all_gather(torch.tensor([1.0], device=pl_module.device))),
            "torchmetric_mean": float(pl_module.rank_mean.compute()),
        }


before, after, gather = Recorder("before"), Recorder("after"), Gather()
space = {"lr": LogUniform(1e-3, 0.5), "dropout": Uniform(0.0, 0.5)}
space.update(space_from_config(cfg.get("extra_space", {})))
pbt = PopulationBasedTraining(
    space,
    monitor=cfg.get("monitor", "val_acc"),
    mode="max",
    # "default_interval": neither interval given, so a ready step at every validation end
    every_n_train_steps=None if cfg.get("default_interval") else cfg.get("every", 4),
    seed=cfg.get("seed", 0),
    quantile_fraction=cfg.get("quantile", 0.5),
    rejuvenate_patience=cfg.get("rejuvenate_patience"),
    rejuvenate_modules=cfg.get("rejuvenate_modules"),
    burn_in=cfg.get("burn_in", 0),
    start_hyperparameters=cfg.get("start"),
    custom_explore=cfg.get("custom_explore"),
    exploit=cfg.get("exploit", "truncation"),
    synchronous=cfg.get("synchronous", True),
    snapshot_every_n_train_steps=cfg.get("snapshot_every"),
    wait_for_peers=cfg.get("wait_for_peers"),
)
callbacks = [before, pbt, after, gather] if cfg.get("pbt", True) else [before, after, gather]
if cfg.get("early_stop_member") is not None:

    class StopOne(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            if trainer.strategy.member_id == cfg["early_stop_member"] and trainer.global_step >= cfg["early_stop_at"]:
                trainer.should_stop = True

    callbacks.insert(0, StopOne())
if cfg.get("ckpt_every"):
    # Saved at validation end, after the PBT ready step of that step (Lightning runs checkpoints last);
    # all of them are kept so that an elastic restart can roll members back to a common ready step.
    callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), save_last=True, save_top_k=-1))
if MEMBER in cfg.get("ema_members", ()):  # members that differ in their weight-averaging callbacks
    callbacks.append(pl.callbacks.EMAWeightAveraging())
if cfg.get("on_exception_checkpoint"):
    callbacks.append(pl.callbacks.OnExceptionCheckpoint(dirpath=os.path.join(out, "ckpt")))
if cfg.get("kill_world_rank") is not None:

    class Kill(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
            target = trainer.strategy.world_rank == cfg["kill_world_rank"]
            if first_attempt and target and trainer.global_step >= cfg["kill_at"]:
                with open(os.path.join(out, "killed_at"), "w") as f:
                    f.write(str(time.time()))
                os.kill(os.getpid(), 9)

    callbacks.append(Kill())
if cfg.get("kill_before_save") is not None:

    class KillBetweenSaves(pl.Callback):
        """SIGKILL this rank while it saves the checkpoint of ready step ``step``, once member 0 has saved
        its own: a crash between two members' saves of one ready step."""

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            when = cfg["kill_before_save"]
            first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
            if not first_attempt or trainer.strategy.world_rank != when["world_rank"]:
                return
            if trainer.global_step != when["step"]:
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

    callbacks.append(KillBetweenSaves())
precision: dict = {"precision": cfg.get("precision", "32-true")}
if cfg.get("scaler_per_member"):
    # 16-mixed with a GradScaler of each member's own (initial scale 2**(10 + member), growing every 2
    # steps): the donor's and the loser's scaler states differ before an exploit, so the copy shows.
    device = "cuda" if cfg.get("accelerator") == "gpu" else "cpu"
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** (10 + MEMBER), growth_interval=2)
    precision = {"plugins": [pl.plugins.MixedPrecision("16-mixed", device, scaler=scaler)]}
trainer = pl.Trainer(
    accelerator=cfg.get("accelerator", "cpu"),
    **precision,
    devices=cfg["devices"] // cfg.get("processes_per_device", 1),
    strategy=PopulationStrategy(
        member_size=cfg["member_size"], processes_per_device=cfg.get("processes_per_device", 1), timeout=60
    ),
    max_steps=cfg.get("member_max_steps", {}).get(str(MEMBER), cfg["max_steps"]),
    val_check_interval=cfg.get("every", 4),
    check_val_every_n_epoch=None,
    default_root_dir=out,
    callbacks=callbacks,
    enable_model_summary=False,
    log_every_n_steps=1,
    logger=pl.loggers.CSVLogger(out),
    enable_progress_bar=False,
    max_time=cfg.get("max_time"),
)
# Different initial weights per member, reproducible: seed before building the model.
pl.seed_everything(cfg.get("seed", 0) + MEMBER, verbose=False)
model = Net()
if (
    cfg.get("raise_in_rank") is not None
    and int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0))) == cfg["raise_in_rank"]
):

    class Boom(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step >= cfg.get("raise_at", 3):
                raise RuntimeError("injected failure")

    trainer.callbacks.append(Boom())
if cfg.get("serve_fail_member") == MEMBER:  # this member's snapshot server breaks at its first request
    import lightning_pbt.distributed.transfer

    def broken_send(*args, **kwargs):
        raise RuntimeError("injected serving failure")

    lightning_pbt.distributed.transfer.send_state = broken_send
ckpt_path = "last" if cfg.get("resume") else None
resume_step = cfg.get("resume_step_by_rank", {}).get(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
if ckpt_path and resume_step is not None:  # this rank is given an older checkpoint of its member than "last"
    folder = os.path.join(out, "ckpt", f"member_{MEMBER}")
    ckpt_path = next(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(f"-step={resume_step}.ckpt"))
try:
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
except Exception as error:  # each rank leaves its own error behind: the tests check every rank raised
    rank = int(os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or 0)
    with open(os.path.join(out, f"error_{rank}.txt"), "w") as f:
        f.write(f"{type(error).__name__}: {error}")
    raise
result = {
    "package": type(trainer).__module__.split(".")[0],
    "world_rank": trainer.strategy.world_rank,
    "device": str(trainer.strategy.root_device),
    "population_backend": trainer.strategy.population.backend_name,
    "member": trainer.strategy.member_id,
    "global_rank": trainer.global_rank,
    "world_size": trainer.world_size,
    "is_global_zero": trainer.is_global_zero,
    "global_step": trainer.global_step,
    "final": state_digest(trainer),
    "initial": before.initial,
    "before": before.records,
    "after": after.records,
    "batches": before.batches,
    "seen_dropout": model.seen_dropout,
    "train_samples": model.train_samples,
    "first_epoch_indices": model.first_epoch_indices,
    "log_dir": trainer.log_dir,
    "rank_value": float(trainer.callback_metrics.get("rank_value", float("nan"))),
    **gather.results,
    "population": {str(k): v for k, v in pbt.population.items()} if cfg.get("pbt", True) else None,
    "hyperparameters": pbt.hyperparameters,
}
if cfg.get("validate_after"):
    pre = state_digest(trainer)["model"]
    trainer.validate(model, val, verbose=False)
    result["validate_kept_weights"] = pre == state_digest(trainer)["model"]
with open(os.path.join(out, f"rank_{trainer.strategy.world_rank}.json"), "w") as f:
    json.dump(result, f)
