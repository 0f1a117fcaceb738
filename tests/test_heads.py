"""Pooling heads (head=gap, head=attention) on each family's unpooled feature map, and what must keep
working with them: freezing, layer decay, export and Grad-CAM."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torch import nn

from tests.conftest import FAST, run_tool, validate
from transferlab.backbones import build_backbone
from transferlab.backbones.feature_maps import to_tokens
from transferlab.errors import ConfigError
from transferlab.inference.gradcam import cam_target, grad_cam
from transferlab.inference.model import load_inference_model
from transferlab.models.classifier import ImageClassifier
from transferlab.models.heads import AttentionPoolHead, GlobalAvgPoolHead, LinearHead, MLPHead

# one small member of each family (source, name, input size); timm's test_* models are the families'
# layouts at toy widths
FAMILIES = {
    "resnet": ("torchvision", "resnet18", 32),
    "mobilenet": ("torchvision", "mobilenet_v3_small", 32),
    "efficientnet": ("timm", "test_efficientnet", 32),
    "convnext": ("timm", "test_convnext", 32),
    "vit": ("timm", "test_vit", 160),
}
HEADS = {"linear": {}, "mlp": {"hidden_dim": 8}, "gap": {}, "attention": {"num_heads": 2}}


def test_attention_weights_sum_to_one_over_positions():
    head = AttentionPoolHead(in_features=8, num_classes=3, num_heads=2)
    head.query.data.normal_()  # away from the near-uniform start
    weights = head.attention(torch.randn(4, 10, 8))
    assert weights.shape == (4, 2, 10)
    assert torch.allclose(weights.sum(dim=-1), torch.ones(4, 2))
    assert not torch.allclose(weights, torch.full_like(weights, 0.1))


def test_attention_starts_as_average_pooling():
    head = AttentionPoolHead(in_features=8, num_classes=3)
    head.query.data.zero_()
    tokens = torch.randn(2, 5, 8)
    pooled_by_gap = GlobalAvgPoolHead(8, 3)
    pooled_by_gap.classifier.load_state_dict(head.classifier.state_dict())
    assert torch.allclose(head(tokens), pooled_by_gap(head.norm(tokens)), atol=1e-6)


def test_a_hand_set_query_attends_to_the_one_marked_position():
    """Keys = the normed tokens; the query looks along channel 0; only position 3 is high there."""
    head = AttentionPoolHead(in_features=4, num_classes=2)
    with torch.no_grad():
        head.key.weight.copy_(torch.eye(4))
        head.key.bias.zero_()
        head.query.copy_(torch.tensor([[20.0, 0.0, 0.0, 0.0]]))
    tokens = torch.zeros(1, 6, 4)
    tokens[0, :, 1] = 1.0
    tokens[0, 3] = torch.tensor([4.0, 0.0, 1.0, 0.0])
    weights = head.attention(tokens)[0, 0]
    assert weights.argmax() == 3 and weights[3] > 0.99


def test_trained_attention_finds_the_position_that_holds_the_label():
    """The class is whether channel 1 exceeds channel 2 at the one position marked in channel 0, among
    noise: the mean over positions hides it, attention must find it."""
    torch.manual_seed(0)
    count, positions, channels = 512, 8, 8
    tokens = torch.randn(count, positions, channels)
    marked = torch.randint(positions, (count,))
    tokens[torch.arange(count), marked, 0] = 4.0
    labels = (tokens[torch.arange(count), marked, 1] > tokens[torch.arange(count), marked, 2]).long()
    heads = {"attention": AttentionPoolHead(channels, 2), "gap": GlobalAvgPoolHead(channels, 2)}
    accuracy = {}
    for name, head in heads.items():
        optimizer = torch.optim.Adam(head.parameters(), lr=0.02)
        for _ in range(150):
            optimizer.zero_grad()
            nn.functional.cross_entropy(head(tokens), labels).backward()
            optimizer.step()
        accuracy[name] = (head(tokens).argmax(1) == labels).float().mean().item()
    with torch.no_grad():
        on_marked = heads["attention"].attention(tokens)[torch.arange(count), 0, marked]
    assert on_marked.mean() > 0.9
    assert accuracy["attention"] > 0.95 and accuracy["gap"] < 0.8


@functools.cache
def classifier(family: str, head: str) -> ImageClassifier:
    source, name, _ = FAMILIES[family]
    return ImageClassifier(
        backbone={"source": source, "name": name, "weights": None},
        head={"_target_": _targets()[head], **HEADS[head]},
        num_classes=3,
        class_names=["a", "b", "c"],
        optim={"_target_": "torch.optim.SGD", "lr": 0.01},
        scheduler={"name": "none"},
        freeze={"name": "none"},
        preprocessing={},
    )


@functools.cache
def _targets() -> dict[str, str]:
    classes = {"linear": LinearHead, "mlp": MLPHead, "gap": GlobalAvgPoolHead, "attention": AttentionPoolHead}
    return {key: f"{cls.__module__}.{cls.__name__}" for key, cls in classes.items()}


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_each_head_trains_a_step_on_each_family(family, head):
    model = classifier(family, head)
    size = FAMILIES[family][2]
    images, targets = torch.randn(2, 3, size, size), torch.tensor([0, 2])
    model.train()
    before = {name: p.detach().clone() for name, p in model.head.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(images), targets)
    loss.backward()
    assert all(p.grad is not None for p in model.backbone.parameters()), "a backbone layer went unused"
    optimizer.step()
    assert any(not torch.equal(before[name], p) for name, p in model.head.named_parameters())
    if head in ("gap", "attention"):
        tokens = model.features(images)
        assert tokens.dim() == 3 and tokens.shape[-1] == model.num_features


def test_tokens_of_a_cnn_are_its_positions_and_a_vits_its_patches():
    resnet = build_backbone("torchvision", "resnet18", feature_map=True)
    assert resnet.features(torch.randn(1, 3, 64, 64)).shape == (1, 4, 512)  # 2 x 2 positions
    vit = build_backbone("timm", "test_vit", feature_map=True)
    patches = (160 // vit.module.patch_embed.patch_size[0]) ** 2
    assert vit.features(torch.randn(1, 3, 160, 160)).shape == (1, patches, vit.num_features)
    grid = torch.arange(24.0).view(1, 2, 3, 4)
    assert torch.equal(to_tokens(grid)[0, 5], grid[0, :, 1, 1])


def test_a_pooling_head_drops_the_fully_connected_layers_of_vgg_like_backbones():
    alexnet = build_backbone("torchvision", "alexnet", feature_map=True)  # VGG's layout, smaller
    assert alexnet.num_features == 256 and alexnet.classifier_prefix == "classifier"
    assert not any(name.startswith("classifier.") for name in alexnet.module.state_dict())


def test_a_family_without_a_known_map_is_refused_before_any_data_is_read(fast_cfg):
    cfg = fast_cfg("head=gap", "backbone=torchvision", "backbone.name=googlenet")
    with pytest.raises(ConfigError, match="torchvision's GoogLeNet; use head=linear or head=mlp"):
        validate(cfg)
    with pytest.raises(ConfigError, match="head=linear or head=mlp"):
        build_backbone("torchvision", "googlenet", feature_map=True)


@pytest.fixture(scope="module")
def attention_run(tmp_path_factory):
    """A run with head=attention, gradual unfreezing and layer decay: it trains, and its checkpoint
    exports (parity checked) and gets a Grad-CAM."""
    run_dir = tmp_path_factory.mktemp("attention") / "run"
    overrides = [
        *FAST,
        "head=attention",
        "freeze=gradual",
        "freeze.milestones=[1]",
        "optim.layer_decay=0.8",
        "data.num_workers=0",
        "trainer.max_epochs=2",
        "logger=none",
        f"hydra.run.dir={run_dir}",
    ]
    assert run_tool("train", *overrides) == 0
    return run_dir


def test_an_attention_head_run_trains_with_gradual_unfreezing_and_layer_decay(attention_run):
    metrics = json.loads((attention_run / "metrics.json").read_text())
    assert 0 <= metrics["test/acc"] <= 1
    model, _ = load_inference_model(attention_run / "checkpoints" / "best.ckpt")
    assert isinstance(model.head, AttentionPoolHead) and model.feature_map is not None


def test_an_attention_head_checkpoint_exports_and_gets_a_gradcam(attention_run, tmp_path):
    ckpt = attention_run / "checkpoints" / "best.ckpt"
    assert run_tool("export", f"ckpt_path={ckpt}", "format=onnx", f"hydra.run.dir={tmp_path / 'export'}") == 0
    model, _ = load_inference_model(ckpt)
    heat = grad_cam(model, cam_target(model.backbone), torch.randn(2, 3, 16, 16), [0, 1])
    assert heat.maps.shape[0] == 2 and torch.isfinite(torch.as_tensor(heat.maps)).all()
