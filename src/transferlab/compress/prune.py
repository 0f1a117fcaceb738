"""Pruning a classifier: structured (whole channels, a really smaller network) and unstructured.

Structured: torch-pruning (MIT) traces the whole classifier's forward into a dependency graph, so
removing an output channel of one layer also removes the matching inputs of every layer that reads
it (residual additions, depthwise convolutions, squeeze-excitation, the head's input features).
Channels are ranked by the norm of their weights (`prune.importance`); every prunable layer of the
backbone loses the same fraction (`prune.amount`, uniform rather than global ranking: no layer is
emptied and the speed-up is predictable), or only the stages named in `prune.stages`. The head keeps
its own widths (its outputs are the classes). The new widths go into the model's hyperparameters
(`pruned`, see `models.pruned`), so the result saves and loads as an ordinary checkpoint.

Unstructured: `prune_unstructured` zeroes the smallest weights (torch.nn.utils.prune, global L1).
The tensors keep their shapes and dense kernels multiply the zeros anyway: it saves nothing in
latency or file size unless the model is stored or run sparse.
"""

from __future__ import annotations

import logging
import statistics
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.nn.utils import prune as torch_prune

from transferlab.checkpoints import checkpoint_run_dir, read_checkpoint
from transferlab.compress.timing import LATENCY_BATCHES, timed_ms
from transferlab.config import parse_train_config
from transferlab.config.schema import OptimizeConfig, PruneConfig
from transferlab.errors import ConfigError
from transferlab.evaluation import calibration_batches, checkpoint_data, default_split
from transferlab.files import atomic_write, write_json
from transferlab.models.classifier import ImageClassifier
from transferlab.models.pruned import module_shapes, pruned_num_features, record_pruned_shapes
from transferlab.training import train

log = logging.getLogger(__name__)

# families the tests prune (tests/test_prune.py) or that were checked by hand (VGG, ConvNeXt)
PRUNABLE_FAMILIES = "ResNet, MobileNetV3, EfficientNet, EfficientNet-Lite, VGG, ConvNeXt"


@dataclass(frozen=True)
class PruneReport:
    """What a structured pruning removed; MACs and parameters of the whole classifier on `example`."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    pruned: dict[str, dict[str, Any]]  # the model's `pruned` hyperparameter: its layer widths


def check_prunable(model: ImageClassifier) -> None:
    """Refuse a backbone with attention layers: torch-pruning needs each one's head layout declared
    (and our record would have to rebuild it), which is not done here."""
    for name, module in model.backbone.named_modules():
        if isinstance(module, nn.MultiheadAttention) or hasattr(module, "num_heads"):
            config = model.backbone_config
            raise ConfigError(
                f"backbone.name={config.name} (source {config.source}) cannot be channel-pruned: "
                f"{name} ({type(module).__name__}) is an attention layer. Structured pruning works on "
                f"convolutional families: {PRUNABLE_FAMILIES}"
            )


def stage_modules(model: ImageClassifier, per_stage: dict[str, float]) -> dict[tuple[nn.Module, ...], float]:
    """torch-pruning's per-layer ratios: the modules holding each named stage's parameters."""
    stages = {stage.name: stage for stage in model.stages}
    unknown = [name for name in per_stage if name not in stages]
    if unknown:
        raise ConfigError(
            f"prune.stages names {', '.join(map(repr, unknown))}, not a stage of backbone.name="
            f"{model.backbone_config.name}; its stages: {', '.join(stages)}"
        )
    ratios = {}
    for name, amount in per_stage.items():
        paths = dict.fromkeys(p.rpartition(".")[0] for p in stages[name].param_names)
        ratios[tuple(model.backbone.get_submodule(path) for path in paths if path)] = amount
    return ratios


def prune_classifier(
    model: ImageClassifier,
    example: torch.Tensor,
    amount: float,
    per_stage: dict[str, float] | None = None,
    importance: str = "l1",
) -> PruneReport:
    """Remove channels of `model`'s backbone in place (a global `amount`, or only the stages of
    `per_stage`, each by its amount); `example` is a batch of images (any size the model takes).
    The result's widths go into `model.hparams["pruned"]`: save it as any checkpoint."""
    import torch_pruning as tp

    config = PruneConfig(amount=amount, stages=per_stage, importance=importance)
    check_prunable(model)
    ratios = stage_modules(model, config.stages) if config.stages else None
    was_training = model.training
    model.eval()  # tracing runs the forward: no batch-norm statistics may move
    try:
        macs_before, params_before = tp.utils.count_ops_and_params(model, example)
        shape_before, shapes = _output_shape(model, example), module_shapes(model)
        with warnings.catch_warnings():
            # ConvNeXt's layer_scale (C, 1, 1): "will prune the last non-singleton dimension", the right one
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            pruner = _pruner(tp, model, example, config, ratios)
        pruner.step()
        _check_output(model, example, shape_before)
        macs_after, params_after = tp.utils.count_ops_and_params(model, example)
    finally:
        model.train(was_training)
    record = record_pruned_shapes(model, shapes, earlier=model.hparams.get("pruned"))
    model.hparams["pruned"] = record
    model.num_features = pruned_num_features(model.head)
    report = PruneReport(int(params_before), int(params_after), int(macs_before), int(macs_after), record)
    log.info(
        "pruned %s: %.2fM -> %.2fM parameters, %.1fM -> %.1fM MACs",
        model.backbone_config.name,
        params_before / 1e6,
        params_after / 1e6,
        macs_before / 1e6,
        macs_after / 1e6,
    )
    return report


def _pruner(tp: Any, model: ImageClassifier, example: torch.Tensor, config: PruneConfig, ratios: Any) -> Any:
    return tp.pruner.BasePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=1 if config.importance == "l1" else 2),
        pruning_ratio=0.0 if ratios else config.amount,
        pruning_ratio_dict=ratios,
        ignored_layers=[model.head],  # the head keeps its widths; its outputs are the classes
    )


def _output_shape(model: nn.Module, example: torch.Tensor) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(model(example).shape)


def _check_output(model: nn.Module, example: torch.Tensor, expected: tuple[int, ...]) -> None:
    """A pruned network that does not run, or answers in another shape, is a pruner bug: said so."""
    try:
        shape = _output_shape(model, example)
    except RuntimeError as err:
        raise RuntimeError(f"the pruned network no longer runs ({err}); please report this backbone") from err
    if shape != expected:
        raise RuntimeError(
            f"pruning changed the output shape {expected} to {shape}; please report this backbone"
        )


def rebuild(model: ImageClassifier) -> ImageClassifier:
    """A fresh `ImageClassifier` from `model`'s hyperparameters and weights, as a checkpoint loads it:
    after pruning in place, the network to fine-tune or save (every attribute consistent)."""
    return ImageClassifier.from_checkpoint(
        {"hyper_parameters": model.hparams, "state_dict": model.state_dict()}
    )


def prune_unstructured(model: nn.Module, amount: float) -> float:
    """Zero the `amount` fraction of smallest-magnitude weights over all convolution and linear layers
    together (global L1), made permanent; returns the fraction of those weights now zero. Shapes and
    run time stay the same: dense kernels still multiply the zeros."""
    PruneConfig(amount=amount)  # the same check and message as prune.amount
    weights = [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    torch_prune.global_unstructured(weights, pruning_method=torch_prune.L1Unstructured, amount=amount)
    for module, name in weights:
        torch_prune.remove(module, name)  # the mask multiplied into the weight: a plain tensor again
    zeros = sum(int((m.weight == 0).sum()) for m, _ in weights)
    return zeros / sum(m.weight.numel() for m, _ in weights)


# --- the job behind `transferlab optimize method=prune` -------------------------------------------------

PRUNED_NAME = "pruned.ckpt"
RECOVERY_DIR = "finetune"
REPORT_NAME = "prune.json"


def prune_checkpoint(config: OptimizeConfig) -> dict[str, Any]:
    """Prune the checkpoint's backbone (`prune.*`), save it as pruned.ckpt, fine-tune it to recover
    (`finetune.epochs`, a training run of its own in finetune/, with the checkpoint's run config, the
    data keys given here, and `init_from`), and report accuracy on the split before pruning, after it
    and after the recovery, parameters, MACs and eager CPU latency in prune.json (written before the
    recovery starts, and again with its result). The recovered best.ckpt is an ordinary checkpoint."""
    output_dir = Path(config.paths.output_dir)
    checkpoint = read_checkpoint(config.ckpt_path, trust=config.trust_checkpoint)
    saved_run = recovery_config(config, checkpoint, output_dir) if config.finetune.epochs else None
    model = ImageClassifier.from_checkpoint(checkpoint)
    check_prunable(model)
    if config.prune.stages:
        stage_modules(model, config.prune.stages)  # a name that is not a stage: refused before any work
    split = default_split(checkpoint, config.ckpt_path)
    data = checkpoint_data(checkpoint, config.ckpt_path, config.data, split, config.seed, output_dir)
    bn_images = (
        calibration_batches(data.datamodule, config.prune.bn_batches, config.seed, "prune.bn_batches")
        if config.prune.bn_batches
        else []
    )
    loader = data.datamodule.split_dataloader(split)
    size = int(checkpoint["hyper_parameters"]["preprocessing"]["crop_size"])
    example = torch.zeros(1, 3, size, size)
    acc = f"{split}/acc"
    before = {acc: accuracy(model, loader), "latency_ms": eager_latency(model, size, config)}
    report = prune_classifier(
        model, example, config.prune.amount, config.prune.stages, config.prune.importance
    )
    model = rebuild(model)
    stale = accuracy(model, loader)
    if bn_images:
        recalibrate_batch_norm(model, bn_images)
    pruned_file = save_pruned(model, checkpoint, output_dir / PRUNED_NAME)
    after = {
        acc: accuracy(model, loader),
        f"{acc}_before_bn_recalibration": stale,
        "bn_batches": config.prune.bn_batches,
        "latency_ms": eager_latency(model, size, config),
    }
    result = {
        "checkpoint": str(config.ckpt_path),
        "backbone": model.backbone_config.name,
        "prune": {"importance": config.prune.importance}
        | ({"stages": config.prune.stages} if config.prune.stages else {"amount": config.prune.amount}),
        "params": {"before": report.params_before, "after": report.params_after},
        "macs_per_image": {"before": report.macs_before, "after": report.macs_after},
        "split": split,
        "images": len(loader.dataset),
        "before": before,
        "pruned": {**after, "file": str(pruned_file)},
        "latency": {
            "threads": config.threads or torch.get_num_threads(),
            "runs": config.latency_runs,
            "batches": LATENCY_BATCHES,
        },
    }
    write_json(output_dir / REPORT_NAME, result)  # kept if the recovery fails or is stopped
    if saved_run is not None:
        saved_run.data = asdict(data.datamodule.cfg)  # the data measured here: data.* keys given included
        result["recovered"] = recover(
            saved_run, pruned_file, config.finetune.epochs, output_dir / RECOVERY_DIR
        )
        write_json(output_dir / REPORT_NAME, result)
    log.info("%s", summary_line(result))
    return result


def recovery_config(config: OptimizeConfig, checkpoint: dict[str, Any], output_dir: Path) -> DictConfig:
    """The checkpoint's run config (<run>/.hydra/config.yaml), set to fine-tune the pruned network: every
    stage training, `finetune.epochs` epochs, one process, in output_dir/finetune; checked as train
    checks a config. Read first: a missing or invalid one stops the job before any work."""
    run_dir = checkpoint_run_dir(config.ckpt_path)
    saved_file = run_dir / ".hydra" / "config.yaml"
    if not saved_file.is_file():
        raise ConfigError(
            f"method=prune fine-tunes with the checkpoint's run config, and {saved_file} is missing (a "
            "checkpoint moved out of its run directory?): keep it there, or set finetune.epochs=0 to prune only"
        )
    saved = OmegaConf.load(saved_file)
    with open_dict(saved):
        saved.freeze = {"name": "full", "bn": saved.freeze.get("bn", "adapt")}
        saved.ckpt_path, saved.resume = None, None
        saved.tune.lr_find, saved.calibrate = False, False
        saved.paths.output_dir = str(output_dir / RECOVERY_DIR)
        saved.trainer.max_epochs = config.finetune.epochs
        if config.finetune.lr is not None:
            saved.optim.lr = config.finetune.lr
        _one_process(saved.trainer)
    try:
        parse_train_config(saved)
    except ConfigError as error:
        raise ConfigError(f"{saved_file}, as the recovery fine-tune's config: {error}") from None
    return saved


def _one_process(trainer: DictConfig) -> None:
    """The recovery runs inside this job: a run trained on several devices is fine-tuned on one (Lightning
    would start the others by re-running `optimize`, which would prune again in each)."""
    if trainer.get("devices", 1) in (1, "1") and trainer.get("num_nodes", 1) == 1:
        return
    log.info(
        "The recovery fine-tune runs in one process (the run used trainer.devices=%s, trainer.num_nodes=%s)",
        trainer.get("devices"),
        trainer.get("num_nodes"),
    )
    trainer.devices, trainer.num_nodes = 1, 1
    if "ddp" in str(trainer.get("strategy", "auto")):
        trainer.strategy = "auto"


def recover(saved: DictConfig, pruned_file: Path, epochs: int, run_dir: Path) -> dict[str, Any]:
    """The recovery fine-tune: a training run from the pruned network (`init_from`)."""
    with open_dict(saved):
        saved.init_from = str(pruned_file)
    # its config where train.py keeps a run's: resume= continues it, and optimize can prune it again
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(saved, run_dir / ".hydra" / "config.yaml")
    log.info("Fine-tuning the pruned network for %d epochs in %s", epochs, run_dir)
    metrics = train(saved)
    return {
        "test/acc": metrics.get("test/acc"),  # None without a test split (or with test_after_fit=false)
        "val/acc": metrics.get("val/acc"),
        "epochs": epochs,
        "best_ckpt": metrics["best_ckpt"],
    }


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, batches: list[Any]) -> None:
    """Every batch norm's running statistics estimated anew from these batches (a cumulative average, in
    training mode, without gradients): pruning changes what each layer receives, and the old statistics
    then mis-normalise it (a digits ResNet-18 lost 21 points at 5 % of its channels with them)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = {norm: norm.momentum for norm in norms}
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # None: the plain average over every batch seen
        norm.train()
    try:
        for images in batches:
            model(torch.as_tensor(images))
    finally:
        for norm in norms:
            norm.momentum = momenta[norm]
        model.eval()


def save_pruned(model: ImageClassifier, checkpoint: dict[str, Any], path: Path) -> Path:
    """The pruned network as a checkpoint of ours (weights and hyperparameters, its widths among them;
    no optimizer state): eval, predict, export and init_from read it."""
    state = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "epoch": checkpoint.get("epoch", 0),
        "global_step": checkpoint.get("global_step", 0),
        "pytorch-lightning_version": checkpoint.get("pytorch-lightning_version"),
    }
    for key in ("datamodule_hyper_parameters", "TransferDataModule"):  # the data it was trained on
        if key in checkpoint:
            state[key] = checkpoint[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(state, f))
    return path


@torch.no_grad()
def accuracy(model: ImageClassifier, loader: Any) -> float:
    logits, targets = model.logits_of(loader)
    return float((logits.argmax(dim=1) == targets).float().mean())


@torch.no_grad()
def eager_latency(model: nn.Module, size: int, config: OptimizeConfig) -> dict[str, float]:
    """Median ms per batch of the eager PyTorch model on the CPU, batch 1 and 32 (`threads` when set)."""
    previous = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    model = model.eval().cpu()
    try:
        timings = {}
        for batch in LATENCY_BATCHES:
            runs = timed_ms(model, torch.randn(batch, 3, size, size), config.latency_runs)
            timings[f"batch{batch}"] = round(statistics.median(runs), 3)
        return timings
    finally:
        torch.set_num_threads(previous)


def summary_line(result: dict[str, Any]) -> str:
    b, p, acc = result["before"], result["pruned"], f"{result['split']}/acc"
    text = (
        f"pruned {result['backbone']}: params {result['params']['before'] / 1e6:.2f}M -> "
        f"{result['params']['after'] / 1e6:.2f}M; {result['split']} acc {b[acc]:.4f} -> {p[acc]:.4f} (no recovery)"
    )
    recovered = result.get("recovered", {})
    if recovered.get(acc) is not None:
        text += f" -> {recovered[acc]:.4f} after {recovered['epochs']} epochs"
    speedup = b["latency_ms"]["batch32"] / p["latency_ms"]["batch32"]
    return (
        text
        + f"; batch 32: {b['latency_ms']['batch32']:.1f} -> {p['latency_ms']['batch32']:.1f} ms ({speedup:.2f}x)"
    )
