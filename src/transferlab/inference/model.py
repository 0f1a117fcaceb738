"""A checkpoint as what deployment needs: the network in eval mode giving calibrated logits, and its
model card (model.json): classes, preprocessing, temperature, where it came from."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferlab.backbones import FeatureMap, run_backbone
from transferlab.checkpoints import read_checkpoint
from transferlab.data.transforms import Preprocessing
from transferlab.errors import ConfigError
from transferlab.models.calibration import stored_temperature

CARD_NAME = "model.json"
CARD_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class InferenceModel(nn.Module):
    """Backbone + head of a checkpoint, in eval mode: images (N, 3, H, W), normalised as the card says,
    to logits divided by the checkpoint's temperature (softmax of them: calibrated probabilities)."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        temperature: float = 1.0,
        feature_map: FeatureMap | None = None,
    ) -> None:
        super().__init__()
        self.backbone, self.head, self.feature_map = backbone, head, feature_map
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(run_backbone(self.backbone, self.feature_map, images)) / self.temperature


@dataclass
class ModelCard:
    """Everything a deployment needs beside the weights; model.json next to an exported model."""

    class_names: list[str]
    preprocessing: dict[str, Any]  # Preprocessing.to_dict(): resize_size, crop_size, mean, std, interpolation
    temperature: float
    allow_hflip: bool  # whether a horizontal flip keeps an image's class (tta=hflip)
    backbone: dict[str, Any]  # source and name
    source_checkpoint: dict[str, Any]  # path and sha256
    format: str = "checkpoint"  # checkpoint | onnx | torchscript
    file: str | None = None  # the model file, relative to model.json
    opset: int | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None  # an int8 model's scheme and calibration; None: fp32
    card_version: int = CARD_VERSION

    @property
    def backbone_label(self) -> str:
        """`source:name`, as messages name the model's backbone."""
        return f"{self.backbone.get('source')}:{self.backbone.get('name')}"

    @property
    def prep(self) -> Preprocessing:
        return Preprocessing.from_dict(self.preprocessing)

    def write(self, directory: Path) -> Path:
        from transferlab.files import write_json

        path = directory / CARD_NAME
        write_json(path, asdict(self))
        return path

    @classmethod
    def read(cls, model_path: Path) -> ModelCard:
        """The card beside an exported model file; a one-line error when it is missing or not ours."""
        path = model_path.parent / CARD_NAME
        if not path.is_file():
            raise ConfigError(
                f"model_path={model_path}: no {CARD_NAME} beside it (it holds the classes and preprocessing); "
                "export again with `transferlab export`, or predict from the checkpoint (ckpt_path=...)"
            )
        try:
            values = json.loads(path.read_text())
            return cls(**values)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{path} is not a model card of transferlab ({err})") from err


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_card(checkpoint: dict[str, Any], ckpt_path: str | Path) -> ModelCard:
    """The card of a checkpoint as `read_checkpoint` returns it."""
    hparams = checkpoint["hyper_parameters"]
    data = (checkpoint.get("datamodule_hyper_parameters") or {}).get("data") or {}
    prep = Preprocessing.from_dict(hparams["preprocessing"])
    path = Path(ckpt_path).expanduser().resolve()
    return ModelCard(
        class_names=list(hparams["class_names"]),
        preprocessing=prep.to_dict(),
        temperature=stored_temperature(checkpoint),
        allow_hflip=bool(data.get("allow_hflip", True)),
        backbone={key: hparams["backbone"].get(key) for key in ("source", "name")},
        source_checkpoint={"path": str(path), "sha256": file_sha256(path)},
        inputs={
            "name": INPUT_NAME,
            "shape": ["batch", 3, prep.crop_size, prep.crop_size],
            "dtype": "float32",
            "layout": "NCHW, RGB, resized, center-cropped and normalised as `preprocessing` says",
        },
        outputs={
            "name": OUTPUT_NAME,
            "shape": ["batch", len(hparams["class_names"])],
            "meaning": "logits already divided by `temperature`: their softmax is the class probabilities",
        },
    )


def load_inference_model(ckpt_path: str | Path, trust: bool = False) -> tuple[InferenceModel, ModelCard]:
    """The checkpoint's network (on the CPU, eval mode) and its card."""
    return inference_model(read_checkpoint(ckpt_path, trust=trust), ckpt_path)


def inference_model(checkpoint: dict, ckpt_path: str | Path) -> tuple[InferenceModel, ModelCard]:
    """`load_inference_model` of a checkpoint already read (`read_checkpoint`): not loaded again (its card's
    sha256 reads the file's bytes once more)."""
    from transferlab.models.classifier import ImageClassifier

    classifier = ImageClassifier.from_checkpoint(checkpoint)
    model = InferenceModel(
        classifier.backbone, classifier.head, stored_temperature(checkpoint), classifier.feature_map
    )
    return model, checkpoint_card(checkpoint, ckpt_path)
