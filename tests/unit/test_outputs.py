"""Member-scoped outputs without processes: every member's loggers and checkpoints in its own folder,
moved under the agreed run directory, explicit folders elsewhere left where they are."""

from __future__ import annotations

import os
from types import SimpleNamespace

from lightning_pbt.plugin._lightning import ModelCheckpoint, OnExceptionCheckpoint
from lightning_pbt.plugin.outputs import agree_on_run_dir, scope_outputs


class _Logger:
    def __init__(self, save_dir: str, writing: bool = False) -> None:
        self._save_dir = save_dir
        self._experiment = object() if writing else None


class SaveConfigCallback:  # LightningCLI's, known by name
    save_to_log_dir = True


def _trainer(root, loggers, callbacks):
    return SimpleNamespace(default_root_dir=str(root), loggers=loggers, callbacks=callbacks)


def test_loggers_and_checkpoints_go_to_the_members_folder(tmp_path):
    logger, busy = _Logger(str(tmp_path / "logs")), _Logger(str(tmp_path / "busy"), writing=True)
    explicit = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"))
    on_exception = OnExceptionCheckpoint(dirpath=str(tmp_path / "exc"))
    trainer = _trainer(tmp_path, [logger, busy], [explicit, on_exception])
    assert scope_outputs(trainer, 2) == str(tmp_path)
    assert logger._save_dir == str(tmp_path / "logs" / "member_2")
    assert busy._save_dir == str(tmp_path / "busy")  # already writing: moving it would split its files
    assert explicit.dirpath == str(tmp_path / "ckpt" / "member_2")
    assert on_exception.dirpath == str(tmp_path / "exc" / "member_2")


def test_without_a_logger_checkpoints_go_under_the_root_and_member_0_alone_writes_the_config(tmp_path):
    for member, writes in ((0, True), (1, False)):
        checkpoint, config = ModelCheckpoint(), SaveConfigCallback()
        scope_outputs(_trainer(tmp_path, [], [checkpoint, config]), member)
        assert checkpoint.dirpath == os.path.join(str(tmp_path), f"member_{member}", "checkpoints")
        assert config.save_to_log_dir is writes


def test_the_run_directory_is_rank_0s_and_folders_inside_the_local_root_move_under_it(tmp_path):
    local, agreed = tmp_path / "mine", tmp_path / "rank0"
    logger = _Logger(str(local / "logs"))
    inside, outside = ModelCheckpoint(dirpath=str(local / "ckpt")), ModelCheckpoint(dirpath=str(tmp_path / "abs"))
    trainer = _trainer(local, [logger], [inside, outside])
    root = scope_outputs(trainer, 1)
    broadcasts = []

    def broadcast_json(value, source):
        broadcasts.append((value, source))
        return str(agreed)

    run_dir = agree_on_run_dir(trainer, SimpleNamespace(broadcast_json=broadcast_json), 1, root)
    assert run_dir == trainer._default_root_dir == str(agreed) and broadcasts == [(None, 0)]
    assert logger._save_dir == str(agreed / "logs" / "member_1")
    assert inside.dirpath == str(agreed / "ckpt" / "member_1")
    assert outside.dirpath == str(tmp_path / "abs" / "member_1")  # an explicit folder elsewhere stays
