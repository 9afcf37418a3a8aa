"""Where a member's tensors wait while other members of its process take their turn.

The choice is pure (:func:`~lightning_pbt.algorithm.topology.parking_place`: page-locked host memory on a
GPU, unless kept on the device; nothing moves on the CPU); this module applies it, by one code path on
every device: :func:`park_tensors` walks the member's weights, buffers, gradients and optimizer state and
puts each where the choice says (on the CPU: where it already is, so no copy is made), and the function
it returns puts each back on the device it came from.

Parameters keep their identity (``param.data`` is replaced, as ``Module.to`` does), so optimizers and
DDP keep referring to them. The optimizer state is walked again when the member resumes, not replayed:
an exploit that loads a donor's optimizer state while the member is parked replaces those tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from lightning_pbt.algorithm.topology import ParkingPlace, parking_place

__all__ = ["park_member", "park_tensors"]


def _copy_to(tensor: torch.Tensor, device: torch.device | None, pin_memory: bool) -> torch.Tensor:
    """``tensor`` on ``device`` in storage of its own (``None``: ``tensor`` itself, nothing copied)."""
    if device is None:
        return tensor
    return torch.empty_like(tensor, device=device, pin_memory=pin_memory).copy_(tensor)


def _optimizer_tensors(optimizers: Iterable[torch.optim.Optimizer]) -> Iterable[tuple[dict, Any, Any]]:
    """``(state, key, where)`` for every tensor of every optimizer's state; ``where`` names its slot
    independently of the tensor (optimizer index, parameter, key), so that it outlives a ``load_state_dict``."""
    for index, optimizer in enumerate(optimizers):
        for param, state in optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    yield state, key, (index, id(param), key)


def park_tensors(
    module: torch.nn.Module, optimizers: Iterable[torch.optim.Optimizer], place: ParkingPlace
) -> Callable[[], None]:
    """Move a member's weights, buffers, gradients and optimizer state to ``place``; return the function
    that moves them back, each to the device it was on (an optimizer state loaded meanwhile included).

    Args:
        module: the member's LightningModule.
        optimizers: its optimizers.
        place: where parked tensors live (:func:`~lightning_pbt.algorithm.topology.parking_place`).
    """
    optimizers = list(optimizers)
    target = torch.device(place.device) if place.device is not None else None
    tensors = [*module.parameters(), *module.buffers()]
    devices = [tensor.device for tensor in tensors]
    param_devices = {id(tensor): tensor.device for tensor in tensors}
    for tensor in tensors:
        tensor.data = _copy_to(tensor.data, target, place.pin_memory)
        if tensor.grad is not None:
            tensor.grad = _copy_to(tensor.grad, target, place.pin_memory)
    slot_devices, key_devices = {}, {}
    for state, key, where in _optimizer_tensors(optimizers):
        slot_devices[where] = key_devices[key] = state[key].device  # Adam's "step" stays on the CPU
        state[key] = _copy_to(state[key], target, place.pin_memory)

    def unpark() -> None:
        for tensor, device in zip(tensors, devices, strict=True):
            back = None if target is None else device
            tensor.data = _copy_to(tensor.data, back, False)
            if tensor.grad is not None:
                tensor.grad = _copy_to(tensor.grad, back, False)
        for state, key, where in _optimizer_tensors(optimizers):
            # a slot an exploit filled while parked: where that key lives in other slots, else by its parameter
            device = slot_devices.get(where, key_devices.get(key, param_devices.get(where[1])))
            state[key] = _copy_to(state[key], None if target is None else device, False)

    return unpark


def park_member(protocol: Any, keep_on_device: bool = False) -> Callable[[], None]:
    """Park the member a ready-step protocol serves (its Trainer's module and optimizers) where
    :func:`~lightning_pbt.algorithm.topology.parking_place` says for its device; return the unpark."""
    member = protocol.member
    trainer = member.trainer
    place = parking_place(member.device.type, keep_on_device)
    return park_tensors(trainer.lightning_module, trainer.optimizers, place)
