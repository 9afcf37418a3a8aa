"""bench/app_members.py: a member that takes turns measures itself as the app's own validation and test
loops would (the apps' ``Trainer.validate`` / ``Trainer.test`` are refused with turns), and takes its own
grid point. One process, one device, tiny sizes: a few seconds."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("hydra")

from bench.applications import SMOKE_OVERRIDES  # puts examples/ on sys.path

TINY = {
    "image_classification": ["model.channels=4"],
    "language_model": ["data.eval_bytes=20000"],  # 312 windows: batches of 256 and 56, a weighted mean
    "reinforcement_learning": ["model.env_id=CartPole-v1", "model.eval_seeds=[1000,1001]",
                               "model.test_seeds=[2000,2001,2002]", "model.hidden=8"],
}
SCORES = {"image_classification": ("val_acc", "test_acc"), "language_model": ("val_loss", "test_perplexity"),
          "reinforcement_learning": ("eval_return", "test_return")}


def build(app_name: str, seed: int = 0):
    import importlib

    import pytorch_lightning as pl
    from hydra import compose, initialize_config_dir

    app = importlib.import_module(app_name)
    with initialize_config_dir(config_dir=app.CONFIG_DIR, version_base="1.3"):
        conf = compose(config_name=app_name, overrides=[*SMOKE_OVERRIDES[app_name], *TINY[app_name]])
    pl.seed_everything(seed, verbose=False)
    built = app.build(conf)
    return built if isinstance(built, tuple) else (built, None)


def plain_trainer():
    import pytorch_lightning as pl

    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)


@pytest.mark.parametrize("app", list(SCORES))
def test_final_evaluation_matches_the_apps_validation_and_test_loops(app):
    """Weights after a few training steps (BatchNorm statistics and dropout make train and eval mode
    differ), measured by Lightning's loops and by the benchmark's evaluation: the same numbers."""
    import pytorch_lightning as pl

    from bench.app_members import evaluate

    model, data = build(app)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, max_steps=3,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    val_name, test_name = SCORES[app]
    val = plain_trainer().validate(model, datamodule=data, verbose=False)[0][val_name]
    test = plain_trainer().test(model, datamodule=data, verbose=False)[0][test_name]
    source = data if data is not None else model
    model.train()  # evaluate() must switch to eval mode itself, and back
    assert evaluate(app, model, source.val_dataloader(), test=False) == pytest.approx(val, rel=1e-5)
    assert evaluate(app, model, source.test_dataloader(), test=True) == pytest.approx(test, rel=1e-5)
    assert model.training


def test_each_member_records_its_final_scores_and_values(tmp_path):
    from bench.app_members import FinalEvaluation, evaluate

    app = "language_model"  # validation and test are different texts: their losses differ even untrained
    model, data = build(app)
    plain_trainer().validate(model, datamodule=data, verbose=False)  # builds the network and the splits
    import torch
    from pytorch_lightning.trainer.states import TrainerFn

    fake = SimpleNamespace(strategy=SimpleNamespace(member_size=1, member_id=5), datamodule=data, global_step=0,
                           callbacks=[], sanity_checking=True, state=SimpleNamespace(fn=TrainerFn.FITTING),
                           callback_metrics={"val_loss": torch.tensor(9.0)})
    evaluation = FinalEvaluation(app, "default", tmp_path, fixed={"lr": 0.05}, monitor="val_loss")
    evaluation.on_train_start(fake, model)
    evaluation.on_validation_end(fake, model)  # the sanity check: not part of the curve
    for step, loss in ((3, 5.5), (7, float("nan"))):
        fake.sanity_checking, fake.global_step, fake.callback_metrics["val_loss"] = False, step, torch.tensor(loss)
        evaluation.on_validation_end(fake, model)
    evaluation.on_train_end(fake, model)
    record = json.loads((tmp_path / "member_5.json").read_text())
    assert record["member"] == 5 and record["arm"] == "default" and record["steps"] == 7
    assert record["val"] == pytest.approx(evaluate(app, model, data.val_dataloader(), test=False))
    assert record["test"] == pytest.approx(evaluate(app, model, data.test_dataloader(), test=True))
    assert abs(record["test"] - 2.718281828 ** record["val"]) > 1e-3  # two splits, not one measured twice
    assert record["hyperparameters"] == {"lr": 0.05}
    assert record["monitor"] == "val_loss" and record["history"] == [[3, 5.5], [7, None]]  # a NaN as null


def test_grid_point_is_the_members_own_and_reaches_optimizer_and_module():
    import torch

    from bench.app_members import GridPoint
    from bench.applications import grid_points

    model, _ = build("image_classification")
    model.configure_model()
    optimizer = model.configure_optimizers()
    points = grid_points("image_classification", 16)
    for member in (0, 6, 15):
        fake = SimpleNamespace(strategy=SimpleNamespace(member_id=member), optimizers=[optimizer],
                               lr_scheduler_configs=[])
        GridPoint(points).on_train_start(fake, model)
        assert optimizer.param_groups[0]["lr"] == points[member]["lr"]
        assert optimizer.param_groups[0]["weight_decay"] == points[member]["weight_decay"]
        assert model.hparams.augment == points[member]["augment"]
        assert model.hparams.label_smoothing == points[member]["label_smoothing"]
    assert isinstance(optimizer, torch.optim.SGD)
    fake = SimpleNamespace(strategy=SimpleNamespace(member_id=16), optimizers=[optimizer], lr_scheduler_configs=[])
    with pytest.raises(ValueError, match="member 16 has no grid point"):
        GridPoint(points).on_train_start(fake, model)
