"""The models predict and export's parity check run: a checkpoint (PyTorch), a TorchScript file or an
ONNX model (ONNX Runtime, no PyTorch model code). Each maps a normalised image batch to calibrated
logits, and carries its model card."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol

import torch

from transferlab.errors import ConfigError
from transferlab.inference.model import ModelCard, load_inference_model

MODEL_SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript"}


class Predictor(Protocol):
    card: ModelCard

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float32 normalised images -> (N, classes) calibrated logits, on the CPU."""
        ...


def resolve_device(device: str, setting: str | None = None) -> torch.device:
    """`device` (auto | cpu | cuda) as a torch device; `setting`: how the user chose it, `key=value`, for
    the message when CUDA is missing (default `device=<device>`, predict's and analyze's key)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        setting = setting or f"device={device}"
        key = setting.split("=")[0]
        raise ConfigError(f"{setting}: no CUDA device is available here; use {key}=cpu or auto")
    return torch.device(device)


def one_score_per_class(logits: torch.Tensor, card: ModelCard, source: str) -> torch.Tensor:
    """`logits`, checked to hold a score for each of the card's classes: a model.json left beside another
    export's file would otherwise name every prediction with the wrong class."""
    if logits.ndim != 2 or logits.shape[1] != len(card.class_names):
        raise ConfigError(
            f"{source} gives {logits.shape[1] if logits.ndim == 2 else tuple(logits.shape)} scores per image, "
            f"but the model.json beside it lists {len(card.class_names)} classes: that card belongs to "
            "another model; export the checkpoint again (transferlab export)"
        )
    return logits


class TorchPredictor:
    """A PyTorch module (a checkpoint's InferenceModel, or a TorchScript module) on a device."""

    def __init__(self, module: torch.nn.Module, card: ModelCard, device: torch.device, source: str) -> None:
        self.module, self.card, self.device, self.source = module.to(device).eval(), card, device, source

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return one_score_per_class(self.module(images.to(self.device)).float().cpu(), self.card, self.source)


class OnnxPredictor:
    """An ONNX model run by ONNX Runtime on the CPU."""

    def __init__(self, path: Path, card: ModelCard) -> None:
        import onnxruntime

        self.card, self.path = card, path
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own exception types
            raise ConfigError(f"model_path={path} cannot be loaded by ONNX Runtime ({err})") from err
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().cpu().contiguous().numpy()
        logits = torch.from_numpy(self.session.run(None, {self.input_name: array})[0])
        return one_score_per_class(logits, self.card, f"model_path={self.path}")


def model_format(path: Path) -> str:
    form = MODEL_SUFFIXES.get(path.suffix.lower())
    if form is None:
        raise ConfigError(
            f"model_path={path}: an exported model ends in .onnx or .pt (TorchScript); "
            "for a checkpoint use ckpt_path="
        )
    return form


def open_exported(model_path: str | Path, device: str = "auto") -> Predictor:
    """An exported model file with its model.json; TorchScript on `device`, ONNX on the CPU."""
    path = Path(model_path).expanduser()
    form = model_format(path)
    if not path.is_file():
        raise ConfigError(f"model_path={path}: no such file")
    card = ModelCard.read(path)
    if card.format != form:
        raise ConfigError(
            f"model_path={path} is {form}, but its {path.parent / 'model.json'} describes {card.format}"
        )
    if form == "onnx":
        return OnnxPredictor(path, card)
    try:
        with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript; the file is still what was asked
            warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        raise ConfigError(f"model_path={path} is not a TorchScript file ({type(err).__name__})") from err
    return TorchPredictor(module, card, resolve_device(device), f"model_path={path}")


def open_checkpoint(ckpt_path: str | Path, device: str = "auto", trust: bool = False) -> Predictor:
    model, card = load_inference_model(ckpt_path, trust=trust)
    return TorchPredictor(model, card, resolve_device(device), f"ckpt_path={ckpt_path}")
