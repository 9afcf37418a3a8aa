"""Hyperparameters meet real torch optimizers and LR schedulers: group ratios, schedule shapes, layouts,
and partial rejuvenation."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as lrs

from lightning_pbt.distributed.optimizer_layout import describe_layout_mismatch, optimizer_layout
from lightning_pbt.plugin import apply
from lightning_pbt.plugin.apply import (
    apply_hyperparameters,
    capture_group_ratios,
    reset_weights,
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def train(model: nn.Module, optimizers: list[torch.optim.Optimizer], steps: int = 3) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = model(torch.randn(16, 6, generator=generator)).square().mean()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()


def fine_tuning_groups(model: Net) -> list[dict]:
    """Backbone slower than the head; biases and norms without weight decay."""
    decayed = [model.backbone[0].weight]
    return [
        {"params": decayed, "lr": 1e-3, "weight_decay": 1e-2},
        {"params": [model.head.weight], "lr": 1e-2, "weight_decay": 1e-2},
        {"params": [model.backbone[0].bias, *model.backbone[1].parameters(), model.head.bias], "weight_decay": 0.0},
    ]


def lrs_of(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(group["lr"]) for group in optimizer.param_groups]


# -- param-group ratios ---------------------------------------------------------------------------
def test_backbone_and_head_keep_their_ratio_and_zero_decay_groups_stay_zero():
    model = Net()
    optimizer = torch.optim.AdamW(fine_tuning_groups(model), lr=1e-3, betas=(0.9, 0.99))
    ratios = capture_group_ratios([optimizer])
    apply_hyperparameters({"lr": 0.1, "weight_decay": 0.05, "betas": (0.5, 0.9)}, [optimizer], [], None, ratios)
    assert lrs_of(optimizer) == pytest.approx([0.1, 1.0, 0.1])
    assert [g["weight_decay"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.05, 0.0])
    assert all(g["betas"] == (0.5, 0.9) for g in optimizer.param_groups)  # not a number: set as it is
    apply_hyperparameters({"lr": 0.2, "weight_decay": 0.0}, [optimizer], [], None, ratios)
    assert lrs_of(optimizer) == pytest.approx([0.2, 2.0, 0.2])
    apply_hyperparameters({"weight_decay": 0.3}, [optimizer], [], None, ratios)  # 0 was applied in between
    assert [g["weight_decay"] for g in optimizer.param_groups] == pytest.approx([0.3, 0.3, 0.0])
    train(model, [optimizer])  # the optimizer still steps


@pytest.mark.parametrize(
    ("initial", "expected"),
    [([0.0, 1e-4, 2e-4], [0.0, 0.1, 0.2]), ([0.0, 0.0], [0.1, 0.1]), ([2e-4, 0.0, 1e-4], [0.1, 0.0, 0.05])],
)
def test_the_first_non_zero_group_is_the_reference(initial, expected):
    params = [nn.Parameter(torch.zeros(2)) for _ in initial]
    optimizer = torch.optim.SGD(
        [{"params": [p], "weight_decay": wd} for p, wd in zip(params, initial, strict=True)], lr=0.1
    )
    apply_hyperparameters({"weight_decay": 0.1}, [optimizer], [], None, capture_group_ratios([optimizer]))
    assert [g["weight_decay"] for g in optimizer.param_groups] == pytest.approx(expected)


def test_gan_optimizers_share_one_reference_across_optimizers():
    generator, discriminator = nn.Linear(4, 4), nn.Linear(4, 1)
    g_opt = torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=1e-4, betas=(0.5, 0.999))
    g_sched, d_sched = lrs.StepLR(g_opt, step_size=2, gamma=0.5), lrs.StepLR(d_opt, step_size=2, gamma=0.5)
    ratios = capture_group_ratios([g_opt, d_opt])
    for _ in range(2):
        g_opt.step()
        d_opt.step()
        g_sched.step()
        d_sched.step()
    apply_hyperparameters({"lr": 0.01}, [g_opt, d_opt], [g_sched, d_sched], None, ratios)
    assert g_sched.base_lrs == pytest.approx([0.01]) and d_sched.base_lrs == pytest.approx([0.005])
    assert lrs_of(g_opt) == pytest.approx([0.005]) and lrs_of(d_opt) == pytest.approx([0.0025])


def test_without_captured_ratios_the_current_ratios_are_kept():
    model = Net()
    optimizer = torch.optim.SGD(fine_tuning_groups(model), lr=1e-3)
    apply_hyperparameters({"lr": 0.1}, [optimizer], [], None)
    assert lrs_of(optimizer) == pytest.approx([0.1, 1.0, 0.1])


def test_ratios_refuse_optimizers_whose_groups_changed():
    model = Net()
    optimizer = torch.optim.SGD(model.backbone.parameters(), lr=0.1)
    ratios = capture_group_ratios([optimizer])
    optimizer.add_param_group({"params": model.head.parameters()})
    with pytest.raises(ValueError, match=r"optimizers changed since fit start .* \[1\] then, \[2\] now"):
        apply_hyperparameters({"lr": 0.2}, [optimizer], [], None, ratios)


# -- LR schedulers --------------------------------------------------------------------------------
# Each builds a scheduler over a fresh two-group optimizer with every lr-valued argument times ``s``.
def _optimizer(s: float, lrs_: tuple[float, float] = (0.01, 0.1)) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr * s} for lr in lrs_], lr=lrs_[0] * s, momentum=0.9
    )


SCHEDULERS: dict[str, Callable[[float], tuple[torch.optim.Optimizer, object]]] = {
    "StepLR": lambda s: (o := _optimizer(s), lrs.StepLR(o, step_size=3, gamma=0.5)),
    "ReduceLROnPlateau": lambda s: (
        o := _optimizer(s),
        lrs.ReduceLROnPlateau(o, factor=0.5, patience=0, min_lr=[0.002 * s, 0.03 * s]),
    ),
    "OneCycleLR": lambda s: (o := _optimizer(s), lrs.OneCycleLR(o, max_lr=[0.1 * s, 1.0 * s], total_steps=20)),
    "SequentialLR": lambda s: (
        o := _optimizer(s),
        lrs.SequentialLR(
            o,
            [lrs.LinearLR(o, start_factor=0.1, total_iters=3), lrs.CosineAnnealingLR(o, T_max=6, eta_min=1e-3 * s)],
            milestones=[3],
        ),
    ),
    "ChainedScheduler": lambda s: (
        o := _optimizer(s),
        lrs.ChainedScheduler([lrs.ConstantLR(o, factor=0.5, total_iters=5), lrs.ExponentialLR(o, gamma=0.9)]),
    ),
    "CosineAnnealingWarmRestarts": lambda s: (
        o := _optimizer(s),
        lrs.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2, eta_min=1e-3 * s),
    ),
    "CyclicLR": lambda s: (
        o := _optimizer(s),
        lrs.CyclicLR(o, base_lr=[0.01 * s, 0.1 * s], max_lr=[0.05 * s, 0.5 * s], step_size_up=2, cycle_momentum=False),
    ),
}
PLATEAU_METRICS = [1.0, 1.0, 2.0, 0.5, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]  # mostly no improvement: reductions


def _step(optimizer: torch.optim.Optimizer, scheduler: object, t: int) -> None:
    optimizer.step()
    if isinstance(scheduler, lrs.ReduceLROnPlateau):
        scheduler.step(PLATEAU_METRICS[t])
    else:
        scheduler.step()


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_a_new_base_rescales_the_schedule_as_if_built_with_it(name):
    """After a new base ``s * b`` at step k, every later rate equals that of the same scheduler built with every
    lr-valued argument times ``s`` and stepped alongside: the shape and position are kept."""
    s = 3.0
    optimizer, scheduler = SCHEDULERS[name](1.0)
    ratios = capture_group_ratios([optimizer])  # at fit start
    twin_optimizer, twin = SCHEDULERS[name](s)
    base = float(optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"]))
    for t in range(4):
        _step(optimizer, scheduler, t)
        _step(twin_optimizer, twin, t)
    assert lrs_of(optimizer) != pytest.approx(lrs_of(twin_optimizer))
    apply_hyperparameters({"lr": base * s}, [optimizer], [scheduler], None, ratios)
    assert lrs_of(optimizer) == pytest.approx(lrs_of(twin_optimizer), rel=1e-9)
    assert [float(v) for v in scheduler.get_last_lr()] == pytest.approx(lrs_of(optimizer), rel=1e-9)
    for t in range(4, 11):
        _step(optimizer, scheduler, t)
        _step(twin_optimizer, twin, t)
        assert lrs_of(optimizer) == pytest.approx(lrs_of(twin_optimizer), rel=1e-9), t
    bases = [float(g["initial_lr"]) for g in optimizer.param_groups]  # ReduceLROnPlateau's too, now
    assert bases == pytest.approx([base * s, 10 * base * s])


def test_plateau_base_travels_with_the_optimizer_state():
    """ReduceLROnPlateau keeps no base: the first application writes ``initial_lr`` into the groups, so a
    member that loads another's optimizer state rescales from the other's base, not its own."""
    donor, donor_scheduler = SCHEDULERS["ReduceLROnPlateau"](1.0)
    loser, loser_scheduler = SCHEDULERS["ReduceLROnPlateau"](1.0)
    ratios = capture_group_ratios([donor])
    apply_hyperparameters({"lr": 0.02}, [donor], [donor_scheduler], None, ratios)
    apply_hyperparameters({"lr": 0.005}, [loser], [loser_scheduler], None, ratios)
    for t in range(3):
        _step(donor, donor_scheduler, t)
    reduced = lrs_of(donor)
    loser.load_state_dict(donor.state_dict())
    loser_scheduler.load_state_dict(donor_scheduler.state_dict())
    apply_hyperparameters({"lr": 0.04}, [loser], [loser_scheduler], None, ratios)
    assert lrs_of(loser) == pytest.approx([2 * lr for lr in reduced])


def test_a_group_at_zero_stays_at_zero_through_the_schedule():
    optimizer = _optimizer(1.0, (0.01, 0.0))
    scheduler = lrs.CosineAnnealingLR(optimizer, T_max=5)
    ratios = capture_group_ratios([optimizer])
    apply_hyperparameters({"lr": 0.3}, [optimizer], [scheduler], None, ratios)
    for _ in range(3):
        _step(optimizer, scheduler, 0)
        assert lrs_of(optimizer)[1] == 0.0 and lrs_of(optimizer)[0] > 0.0


def test_tensor_learning_rates_stay_tensors_and_a_shared_one_is_scaled_once():
    """Capturable/fused optimizers keep lr as a tensor; groups built from the default share one tensor."""
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    optimizer = torch.optim.Adam([{"params": [a]}, {"params": [b]}], lr=torch.tensor(0.01), foreach=False)
    shared = optimizer.param_groups[0]["lr"]
    assert optimizer.param_groups[1]["lr"] is shared
    scheduler = lrs.StepLR(optimizer, step_size=1, gamma=0.5)
    ratios = capture_group_ratios([optimizer])
    (a.sum() + b.sum()).backward()
    optimizer.step()
    scheduler.step()
    apply_hyperparameters({"lr": 0.04}, [optimizer], [scheduler], None, ratios)
    assert optimizer.param_groups[0]["lr"] is shared and isinstance(shared, torch.Tensor)
    assert lrs_of(optimizer) == pytest.approx([0.02, 0.02])  # 0.04 * 0.5, not 0.04 * 0.5 * 4
    assert [float(v) for v in scheduler.base_lrs] == pytest.approx([0.04, 0.04])
    optimizer.step()
    scheduler.step()
    assert lrs_of(optimizer) == pytest.approx([0.01, 0.01])


# -- donor / loser layouts ------------------------------------------------------------------------
def test_optimizer_layouts_match_between_equal_setups_and_name_the_first_difference():
    def layout(groups: bool = True, optimizer=torch.optim.AdamW, extra: bool = False) -> list[dict]:
        model = Net()
        built = [optimizer(fine_tuning_groups(model) if groups else model.parameters(), lr=1e-3)]
        if extra:
            built.append(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
        return json.loads(json.dumps(optimizer_layout(built)))  # travels as JSON

    assert describe_layout_mismatch(layout(), layout()) is None
    assert describe_layout_mismatch(layout(), layout(extra=True)) == "the donor has 1 optimizer(s), the loser 2"
    assert "param group(s) in the donor" in describe_layout_mismatch(layout(), layout(groups=False))
    assert "is a AdamW in the donor and a Adam in the loser" in describe_layout_mismatch(
        layout(), layout(optimizer=torch.optim.Adam)
    )
    moved = layout()
    moved[0]["groups"][0]["params"] += 1
    assert "param group 0 holds 2 parameter(s)" in describe_layout_mismatch(moved, layout())
    keyed = layout()
    keyed[0]["groups"][1]["keys"].append("initial_lr")
    message = describe_layout_mismatch(layout(), keyed)
    assert (
        message
        == "optimizer 0 (AdamW) param group 1 has keys [] only in the donor and ['initial_lr'] only in the loser"
    )


# -- rejuvenation ---------------------------------------------------------------------------------
def trained(model_seed: int = 0) -> tuple[Net, torch.optim.Optimizer, lrs.LRScheduler]:
    torch.manual_seed(model_seed)
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = lrs.StepLR(optimizer, step_size=2, gamma=0.5)
    for _ in range(3):
        train(model, [optimizer], steps=1)
        scheduler.step()
    return model, optimizer, scheduler


def snapshot(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_partial_rejuvenation_resets_only_the_named_modules_and_their_optimizer_state():
    model, optimizer, scheduler = trained()
    backbone, head = snapshot(model.backbone.state_dict().values()), snapshot(model.head.parameters())
    backbone_state = {id(p): snapshot(optimizer.state[p].values()) for p in model.backbone.parameters()}
    schedule = (scheduler.state_dict(), lrs_of(optimizer))
    assert reset_weights(model, [optimizer], seed=5, modules=["head"]) == 1
    assert equal(model.backbone.state_dict().values(), backbone)
    assert not any(torch.equal(a, b) for a, b in zip(model.head.parameters(), head, strict=True))
    assert all(p not in optimizer.state for p in model.head.parameters())
    for p in model.backbone.parameters():  # Adam's moments and step count kept
        assert equal(optimizer.state[p].values(), backbone_state[id(p)])
    # The LR scheduler is left where it is: same step, same rate, the member keeps its schedule.
    assert scheduler.state_dict() == schedule[0] and lrs_of(optimizer) == schedule[1]
    train(model, [optimizer], steps=1)  # fresh state for the head, old state for the backbone: it steps


def test_fresh_weights_depend_on_the_seed_only():
    """What makes the ranks of one member agree: neither the caller's RNG nor the trained weights matter."""
    first, first_opt, _ = trained(model_seed=0)
    second, second_opt, _ = trained(model_seed=1)
    torch.manual_seed(123)
    reset_weights(first, [first_opt], seed=7, modules=["backbone.0", "head"])
    torch.manual_seed(456)
    reset_weights(second, [second_opt], seed=7, modules=["head", "backbone.0"])  # order does not matter
    assert equal(first.head.parameters(), second.head.parameters())
    assert equal(first.backbone[0].parameters(), second.backbone[0].parameters())
    assert not equal(first.backbone[1].parameters(), second.backbone[1].parameters())  # not reset: differ
    third, third_opt, _ = trained(model_seed=1)
    reset_weights(third, [third_opt], seed=8, modules=["head"])
    assert not equal(third.head.parameters(), second.head.parameters())


def test_full_rejuvenation_resets_every_submodule_and_clears_all_state():
    model, optimizer, _ = trained()
    assert reset_weights(model, [optimizer], seed=5) == 3  # two Linear, one BatchNorm
    assert not optimizer.state
    assert torch.equal(model.backbone[1].running_mean, torch.zeros(8))


def test_unknown_module_names_list_the_available_ones():
    model, optimizer, _ = trained()
    before = snapshot(model.parameters())
    with pytest.raises(ValueError, match=r"\['neck'\] are not submodules of Net; available .*'backbone.0'.*'head'"):
        reset_weights(model, [optimizer], seed=5, modules=["head", "neck"])
    assert equal(model.parameters(), before)


def test_the_callers_cpu_and_every_cuda_generator_are_restored(monkeypatch):
    """The same code path as on a GPU machine, with torch.cuda's generator functions standing in."""
    states = {0: torch.tensor([0]), 1: torch.tensor([1])}
    seeded = []

    def manual_seed_all(seed: int) -> None:
        seeded.append(seed)
        for device in states:
            states[device] = torch.tensor([seed])

    def set_rng_state(state: torch.Tensor, device: int) -> None:
        states[device] = state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: states[device])
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", manual_seed_all)
    assert apply._cuda_devices() == [0, 1]
    model, optimizer, _ = trained()
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)  # (seeds the stand-ins too)
    states.update({0: torch.tensor([0]), 1: torch.tensor([1])})
    seeded.clear()
    reset_weights(model, [optimizer], seed=11, modules=["head"])
    assert seeded == [11]
    assert {d: int(s) for d, s in states.items()} == {0: 0, 1: 1}
    assert torch.equal(torch.rand(3), expected)  # the CPU generator continues as if nothing happened
