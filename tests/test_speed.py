"""Speed options: mixed precision as a trainer override, channels_last and torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from transferlab.config.schema import ModelConfig
from transferlab.models.classifier import ImageClassifier
from transferlab.models.speed import apply_speed_options
from transferlab.training import train


def test_mixed_precision_channels_last_and_compile_options(fast_cfg, tmp_path):
    # precision is a plain trainer override; bf16-mixed is the mixed precision that runs on a CPU
    metrics = train(fast_cfg("model.channels_last=true", "trainer.precision=bf16-mixed", output_dir=tmp_path))
    assert 0 <= metrics["test/acc"] <= 1 and math.isfinite(metrics["test/loss"])
    last = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)["state_dict"]
    assert state["backbone.conv1.weight"].dtype == torch.float32  # mixed precision keeps fp32 weights

    model = ImageClassifier.load_from_checkpoint(last, map_location="cpu", weights_only=True)
    apply_speed_options(model, ModelConfig(compile=True, channels_last=True))
    conv = model.backbone.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    # nn.Module.compile() compiles in place (compiled on the first batch, too slow for a test here):
    # parameter names, hence checkpoints, stay the same
    assert model.backbone._compiled_call_impl is not None
    assert "backbone.conv1.weight" in model.state_dict()


def test_compile_with_channels_last_refused_where_a_feature_map_is_1x1_on_cuda():

    from transferlab.errors import ConfigError
    from transferlab.models.speed import check_speed_options, smallest_conv_input

    resnet = torchvision.models.resnet18(num_classes=2)
    assert smallest_conv_input(resnet, 32) == 1 and smallest_conv_input(resnet, 64) == 2
    both = ModelConfig(compile=True, channels_last=True)
    with pytest.raises(
        ConfigError, match=r"model.compile=true with model.channels_last=true: at data.image_size=32"
    ):
        check_speed_options(resnet, both, 32, "cuda")
    check_speed_options(resnet, both, 64, "cuda")  # 2x2 at the smallest: trains (seen on an H100)
    check_speed_options(resnet, both, 32, "cpu")  # the CPU's compiled backward is right
    check_speed_options(resnet, ModelConfig(compile=True), 32, "cuda")
    assert resnet.training  # the probe leaves the modes as they were
