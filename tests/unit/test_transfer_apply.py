"""State flattening for transfers, and applying hyperparameters to optimizers, schedulers and modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_pbt.distributed import transfer
from lightning_pbt.plugin.apply import apply_hyperparameters, check_applicable


def trained_state() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 64), nn.BatchNorm1d(64), nn.Linear(64, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    for _ in range(3):
        model(torch.randn(8, 300)).sum().backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def roundtrip(state, direct_bytes=transfer.DIRECT_BYTES, bucket_bytes=transfer.BUCKET_BYTES):
    flat = transfer.flatten_state(state)
    layout = transfer.message_layout([(t.dtype, t.numel()) for t in flat.tensors], direct_bytes, bucket_bytes)
    sent = transfer.pack_messages(flat.tensors, layout, torch.device("cpu"))
    nest, markers = transfer.read_skeleton(bytes(flat.skeleton_tensor.numpy()))
    in_layout = transfer.message_layout(transfer.specs_of(markers), direct_bytes, bucket_bytes)
    assert in_layout == layout  # both sides derive the same messages
    received = transfer.allocate_messages(markers, in_layout, torch.device("cpu"))
    for buffer, message in zip(received, sent, strict=True):
        buffer.copy_(message)  # stands in for the network
    return transfer.unflatten_state(nest, transfer.unpack_messages(received, markers, in_layout, torch.device("cpu")))


@pytest.mark.parametrize(("direct_bytes", "bucket_bytes"), [(1 << 20, 32 << 20), (64, 256), (1 << 30, 1 << 30)])
def test_full_training_state_survives_a_transfer_bit_exactly(direct_bytes, bucket_bytes):
    model, optimizer, scheduler = trained_state()
    state = {
        "model": model.state_dict(),
        "optimizers": [optimizer.state_dict()],
        "lr_schedulers": [scheduler.state_dict()],
        "precision": {},
    }
    copy = roundtrip(state, direct_bytes, bucket_bytes)
    other, other_optimizer, other_scheduler = trained_state()
    nn.init.zeros_(other[0].weight)
    other.load_state_dict(copy["model"])
    other_optimizer.load_state_dict(copy["optimizers"][0])
    other_scheduler.load_state_dict(copy["lr_schedulers"][0])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, other.state_dict()[name]), name
    for key, value in optimizer.state_dict()["state"].items():
        for field, tensor in value.items():
            assert torch.equal(tensor, other_optimizer.state_dict()["state"][key][field])
    assert other_optimizer.param_groups[0]["betas"] == optimizer.param_groups[0]["betas"]
    assert other_scheduler.state_dict() == scheduler.state_dict()


def test_layout_sends_large_tensors_alone_and_buckets_small_ones_per_dtype():
    specs = [(torch.float32, 10), (torch.int64, 1), (torch.float32, 1 << 20), (torch.float32, 5)]
    layout = transfer.message_layout(specs, direct_bytes=1 << 20, bucket_bytes=1 << 10)
    assert [2] in layout
    assert [0, 3] in layout and [1] in layout
    assert sorted(i for message in layout for i in message) == [0, 1, 2, 3]


def test_skeleton_is_plain_data_and_keeps_python_types():
    state = {
        "state": {0: {"step": torch.tensor(3.0)}},
        "betas": (0.9, 0.99),
        "inf": float("inf"),
        "nested": [{"$odd": None}],
        (1, 2): "tuple key",
        "flag": True,
    }
    copy = roundtrip(state)
    assert copy["state"][0]["step"].item() == 3.0 and list(copy["state"]) == [0]
    assert copy["betas"] == (0.9, 0.99) and copy["inf"] == float("inf")
    assert copy["nested"] == [{"$odd": None}] and copy[(1, 2)] == "tuple key" and copy["flag"] is True


def test_skeleton_cannot_carry_code():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(TypeError, match="cannot transfer a Evil"):
        transfer.flatten_state({"x": Evil()})
    with pytest.raises(ValueError, match="not valid JSON"):
        transfer.read_skeleton(b"\x80\x04\x95 pickle bytes")


class Module(nn.Module):
    def __init__(self):
        super().__init__()
        self.hparams = {"dropout": 0.1, "lr": 0.1}
        self.seen = []

    def on_pbt_hyperparameters(self, values):
        self.seen.append(values)


def test_lr_scales_the_schedule_around_the_new_base():
    _, optimizer, scheduler = trained_state()
    before = optimizer.param_groups[0]["lr"]  # 1e-2 * 0.5 after 3 steps with step_size 2
    assert before == pytest.approx(5e-3)
    apply_hyperparameters({"lr": 0.1}, [optimizer], [scheduler], Module())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-2)
    assert scheduler.base_lrs == [0.1]
    scheduler.step()  # step 4: the next halving happens on the new base
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)


def test_optimizer_keys_and_module_names_reach_their_targets():
    _, optimizer, _ = trained_state()
    module = Module()
    apply_hyperparameters({"lr": 0.3, "weight_decay": 0.01, "dropout": 0.25}, [optimizer], [], module)
    assert optimizer.param_groups[0]["lr"] == 0.3
    assert optimizer.param_groups[0]["weight_decay"] == 0.01
    assert module.hparams == {"dropout": 0.25, "lr": 0.3}
    assert module.seen == [{"dropout": 0.25}]


def test_a_name_nothing_applies_is_a_clear_error():
    _, optimizer, _ = trained_state()
    check_applicable(["lr", "dropout"], [optimizer], Module())
    with pytest.raises(ValueError, match=r"\['colour'\].*param-group keys.*hparams"):
        check_applicable(["lr", "colour"], [optimizer], Module())


def test_spec_hash_tells_different_shapes_apart():
    a = [torch.zeros(3, 4), torch.zeros(2, dtype=torch.int64)]
    assert transfer.spec_hash(a) == transfer.spec_hash([torch.ones(3, 4), torch.ones(2, dtype=torch.int64)])
    assert transfer.spec_hash(a) != transfer.spec_hash([torch.zeros(4, 3), torch.zeros(2, dtype=torch.int64)])
    assert transfer.spec_hash(a) != transfer.spec_hash([torch.zeros(3, 4), torch.zeros(2, dtype=torch.int32)])
