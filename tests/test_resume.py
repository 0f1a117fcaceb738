"""Resume: atomic checkpoints, `resume=<run dir>`, runs killed mid-epoch, SLURM requeues."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import FAST, compose_config
from transferlab.checkpoint_io import AtomicCheckpointIO


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, target)

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert io.load_checkpoint(target)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


@pytest.mark.parametrize("trainer", [[]], ids=["default"])
def test_trainers_built_from_the_configs_save_checkpoints_atomically(tmp_path, trainer):
    from hydra.utils import instantiate

    cfg = compose_config([*FAST, *trainer], tmp_path)
    built = instantiate(cfg.trainer, logger=False)
    assert isinstance(built.strategy.checkpoint_io, AtomicCheckpointIO)


def test_last_ckpt_is_the_last_epoch_even_when_the_metric_did_not_improve(fast_cfg, tmp_path):
    from transferlab.training import train

    # a frozen backbone and a vanishing learning rate: val/acc stays what it was after epoch 0
    train(fast_cfg("trainer.max_epochs=2", "freeze=linear_probe", "optim.lr=1e-12", output_dir=tmp_path))
    epoch = {
        name: torch.load(tmp_path / "checkpoints" / f"{name}.ckpt")["epoch"] for name in ("best", "last")
    }
    assert epoch == {"best": 0, "last": 1}
