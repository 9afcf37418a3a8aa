"""Reinforcement learning: PBT of PPO, written as a LightningModule, on Gymnasium's CartPole-v1.

    python examples/reinforcement_learning.py                   # 4 members, a few minutes on 2 cores
    python examples/reinforcement_learning.py model.env_id=Acrobot-v1 trainer.max_epochs=200
    python examples/reinforcement_learning.py pbt.explore=pb2 '~pbt.hyperparameters.gae_lambda'

A Hydra app over ``configs/reinforcement_learning.yaml``. One training epoch = one rollout of
``rollout_steps`` environment steps with the current policy, then ``update_epochs`` passes of clipped-PPO
minibatch updates over it (the dataloader is a generator over the module's own environment, the pattern
Lightning's RL examples use). Each member is one process with its own environment. Searched: lr (Adam's
param-group key), entropy coefficient, clip range and GAE lambda (``self.hparams``, read at every use).
Score: the mean return of the greedy policy over fixed evaluation seeds; the best member's return over
other, held-out seeds is printed at the end.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributions import Categorical
from torch.utils.data import DataLoader, IterableDataset

from lightning_pbt.tools.hydra_configs import build_callback, build_strategy, check_population, register_configs

register_configs()
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*(does not have many workers|IterableDataset).*")

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


class Rollouts(IterableDataset):
    """Each pass is one rollout and its PPO minibatches, produced by the module's generator."""

    def __init__(self, generate: Any) -> None:
        self.generate = generate

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.generate()


def mlp(n_in: int, n_out: int, hidden: int, out_std: float) -> nn.Sequential:
    layers = [nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, n_out)]
    for layer in layers:
        if isinstance(layer, nn.Linear):  # orthogonal init, as PPO implementations do
            nn.init.orthogonal_(layer.weight, np.sqrt(2) if layer is not layers[-1] else out_std)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class PPO(pl.LightningModule):
    def __init__(self, env_id: str = "CartPole-v1", hidden: int = 64, rollout_steps: int = 512,
                 update_epochs: int = 4, minibatch_size: int = 128, gamma: float = 0.99, gae_lambda: float = 0.95,
                 clip_range: float = 0.2, ent_coef: float = 0.0, vf_coef: float = 0.5, lr: float = 3e-4,
                 eval_seeds: list[int] | None = None, test_seeds: list[int] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()  # PBT writes ent_coef / clip_range / gae_lambda into self.hparams
        self.actor: nn.Module | None = None
        self.env: gym.Env | None = None
        self.episode_return, self.finished_returns, self.train_return = 0.0, [], float("nan")

    def configure_model(self) -> None:
        # Built after the strategy seeded this member: members start from different weights.
        if self.actor is not None:
            return
        env = gym.make(self.hparams.env_id)
        n_obs, n_act = env.observation_space.shape[0], env.action_space.n
        env.close()
        self.actor = mlp(n_obs, n_act, self.hparams.hidden, 0.01)
        self.critic = mlp(n_obs, 1, self.hparams.hidden, 1.0)

    # -- acting -----------------------------------------------------------------------------------
    def policy(self, obs: torch.Tensor) -> Categorical:
        return Categorical(logits=self.actor(obs))

    def _step_env(self, action: int) -> tuple[np.ndarray, float, bool]:
        obs, reward, terminated, truncated, _ = self.env.step(action)
        self.episode_return += float(reward)
        if terminated or truncated:
            self.finished_returns.append(self.episode_return)
            self.episode_return = 0.0
            obs, _ = self.env.reset()
        return obs, float(reward), terminated  # a time-limit truncation still bootstraps from the value

    @torch.no_grad()
    def collect(self) -> dict[str, torch.Tensor]:
        """``rollout_steps`` steps in this member's own environment, with GAE(gamma, lambda) advantages."""
        h = self.hparams
        if self.env is None:  # seeded from the member's torch seed: every member its own episodes
            self.env = gym.make(h.env_id)
            self.obs, _ = self.env.reset(seed=int(torch.initial_seed() % 2**31))
        steps: list[tuple[torch.Tensor, ...]] = []  # (observation, action, log-prob, value) per step
        rewards, dones = [], []
        for _ in range(h.rollout_steps):
            o = torch.as_tensor(self.obs, dtype=torch.float32, device=self.device)
            dist = self.policy(o)
            action = dist.sample()
            steps.append((o, action, dist.log_prob(action), self.critic(o).squeeze(-1)))
            self.obs, reward, terminated = self._step_env(int(action))
            rewards.append(reward)
            dones.append(float(terminated))
        obs, actions, logps, values = (list(column) for column in zip(*steps, strict=True))
        last_value = self.critic(torch.as_tensor(self.obs, dtype=torch.float32, device=self.device)).squeeze(-1)
        values_t = torch.stack([*values, last_value])
        advantages = torch.zeros(h.rollout_steps, device=self.device)
        gae = 0.0
        for t in reversed(range(h.rollout_steps)):
            not_done = 1.0 - dones[t]
            delta = rewards[t] + h.gamma * values_t[t + 1] * not_done - values_t[t]
            gae = delta + h.gamma * h.gae_lambda * not_done * gae
            advantages[t] = gae
        return {"obs": torch.stack(obs), "action": torch.stack(actions), "logp": torch.stack(logps),
                "advantage": advantages, "return": advantages + values_t[:-1]}

    def rollout_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        rollout = self.collect()
        if self.finished_returns:  # training episodes that ended during this rollout (logged by training_step)
            self.train_return, self.finished_returns = float(np.mean(self.finished_returns)), []
        for _ in range(self.hparams.update_epochs):
            order = torch.randperm(self.hparams.rollout_steps, device=self.device)
            for start in range(0, len(order), self.hparams.minibatch_size):
                index = order[start : start + self.hparams.minibatch_size]
                yield {key: value[index] for key, value in rollout.items()}

    @torch.no_grad()
    def episode_return_for(self, seed: int) -> float:
        """One greedy episode from ``seed`` in a fresh environment: the same start for every member."""
        env = gym.make(self.hparams.env_id)
        obs, _ = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            logits = self.actor(torch.as_tensor(obs, dtype=torch.float32, device=self.device))
            obs, reward, terminated, truncated, _ = env.step(int(logits.argmax()))
            total += float(reward)
            done = terminated or truncated
        env.close()
        return total

    # -- learning ---------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        h = self.hparams
        dist = self.policy(batch["obs"])
        advantage = (batch["advantage"] - batch["advantage"].mean()) / (batch["advantage"].std() + 1e-8)
        ratio = torch.exp(dist.log_prob(batch["action"]) - batch["logp"])
        clipped = torch.clamp(ratio, 1 - h.clip_range, 1 + h.clip_range)
        policy_loss = -torch.min(ratio * advantage, clipped * advantage).mean()
        value_loss = (self.critic(batch["obs"]).squeeze(-1) - batch["return"]).pow(2).mean()
        entropy = dist.entropy().mean()
        loss = policy_loss + h.vf_coef * value_loss - h.ent_coef * entropy
        self.log_dict({"policy_loss": policy_loss, "value_loss": value_loss, "entropy": entropy,
                       "train_return": self.train_return})
        return loss

    def validation_step(self, seed: torch.Tensor, batch_idx: int) -> None:
        self.log("eval_return", self.episode_return_for(int(seed)), batch_size=1, sync_dist=True, prog_bar=True)

    def test_step(self, seed: torch.Tensor, batch_idx: int) -> None:
        self.log("test_return", self.episode_return_for(int(seed)), batch_size=1, sync_dist=True)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Rollouts(self.rollout_batches), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(list(self.hparams.eval_seeds), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(list(self.hparams.test_seeds), batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, eps=1e-5)


def build(cfg: DictConfig) -> PPO:
    return PPO(**OmegaConf.to_container(cfg.model, resolve=True))


@hydra.main(config_path=CONFIG_DIR, config_name="reinforcement_learning", version_base="1.3")
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
        sys.exit(f"reinforcement_learning.py: invalid configuration: {err}")
    pl.seed_everything(cfg.seed, verbose=False)
    model = build(cfg)
    trainer = pl.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), strategy=strategy,
                         callbacks=[callback], default_root_dir=str(run_dir),
                         logger=pl.loggers.CSVLogger(str(run_dir), name="", version=""))
    trainer.fit(model)
    scores = {m: s["score"] for m, s in callback.population.items() if s["score"] is not None}
    # The same on every rank; None when no ready step scored anyone (the callback warned why).
    best = (max if cfg.pbt.mode == "max" else min)(scores, key=scores.get) if scores else None
    # Trainer.test is not built for members that take turns (docs/concepts/turns.md): no held-out number then.
    if strategy.members_per_process > 1:
        test_return = None
        if trainer.strategy.world_rank == 0 and best is not None:
            print(f"\nHeld-out: member {best} (eval_return {scores[best]:.1f}), not tested (members take turns)",
                  flush=True)
    else:
        test_return = trainer.test(model, verbose=False)[0]["test_return"]
        if trainer.strategy.member_id == best and trainer.is_global_zero:
            print(f"\nHeld-out: member {best} (eval_return {scores[best]:.1f}), return on "
                  f"{len(cfg.model.test_seeds)} held-out seeds {test_return:.1f}", flush=True)
    if trainer.strategy.world_rank == 0 and cfg.report:
        make_report(trainer.strategy.run_dir or run_dir, mode=cfg.pbt.mode, monitor=cfg.pbt.monitor)
        print(f"Outputs in {trainer.strategy.run_dir or run_dir}/ (pbt/lineage.jsonl, pbt/summary.md)")
    return test_return


if __name__ == "__main__":
    main()
