"""The config schema: every key of every group, with its type, default and allowed values, in one place.

Each group option is a dataclass. Hydra composes with them (`config.store` registers them as
`schema/<group>/<option>`; the YAML presets in `conf/<group>/` start from one and set only the values
that differ), so a value of the wrong type fails at composition, naming the key. `__post_init__` checks
what a type cannot say (ranges, choices) when `config.parse` builds the dataclass, before any data is
read; the messages name the key and the valid choices. Code reads attributes of these dataclasses:
there are no defaults anywhere else.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import MISSING as MISSING_FIELD
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from omegaconf import MISSING

from transferlab.errors import ConfigError
from transferlab.runtime import command_line_overrides, override_key

INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
SPLITS = ("train", "val", "test")


# The metrics the model logs per stage as `<stage>/<name>` (models/metrics.py builds them from this
# table) and the better direction of each: what best.ckpt, early stopping, the plateau schedule and
# sweep tables compare. acc_top5 exists only with more than 5 classes.
METRIC_DIRECTIONS = {
    "loss": "min",
    "acc": "max",
    "acc_top5": "max",
    "precision": "max",
    "recall": "max",
    "f1": "max",
}
MONITORED_STAGE = "val"  # checkpoints and schedules compare validation metrics: each epoch has them


def metric_direction(metric: str) -> str:
    """The better direction of a metric: ours from the table; another (a sweep table's column), min for
    a loss and max otherwise."""
    name = metric.rpartition("/")[2]
    return METRIC_DIRECTIONS.get(name, "min" if "loss" in name else "max")


def check_monitored_metric(metric: str, key: str, mode: str | None, mode_key: str) -> None:
    """`metric` is one the model logs at each validation, and `mode` (if set) is its better direction."""
    valid = [f"{MONITORED_STAGE}/{name}" for name in METRIC_DIRECTIONS]
    if metric not in valid:
        raise ConfigError(
            f"{key}={metric!r} is not a metric logged at each validation; choose one of: {', '.join(valid)}"
        )
    better = metric_direction(metric)
    if mode is not None and mode != better:
        raise ConfigError(
            f"{mode_key}={mode} contradicts {key}={metric}: {'lower' if better == 'min' else 'higher'} is "
            f"better for it. Leave {mode_key} unset (it follows the metric)"
        )


def check_choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")


def check_int(value: Any, key: str, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}")


def is_set(node: Any, key: str, schema: type | None = None) -> bool:
    """`node.key` differs from its default in `schema` (default: the node's own): a value somebody set,
    which the checks of settings that nothing would read refuse."""
    spec = (schema or type(node)).__dataclass_fields__[key]
    default = spec.default_factory() if spec.default_factory is not MISSING_FIELD else spec.default
    return getattr(node, key) != default


def typed_under(group: str) -> bool:
    """A key of `group` was typed on the command line (`prune.amount=0.5`, `+simclr.x=1`, or inside a
    dict given to a node above it: `autoencoder={noise_std: 0.3}` for autoencoder.noise_std): set by the
    user even when the value is the default, which `is_set` cannot tell."""
    for override in command_line_overrides():
        key = override_key(override)
        if key == group or key.startswith(f"{group}."):
            return True
        if group.startswith(f"{key}.") and _dict_holds(override, group.removeprefix(f"{key}.")):
            return True
    return False


def _dict_holds(override: str, path: str) -> bool:
    """The override's value is a dict that holds the dotted `path`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    value = OverridesParser.create().parse_overrides([override])[0].value()
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


MAX_SEED = 2**32 - 1  # numpy's and scikit-learn's seeds; Lightning picks a random one outside it


def check_seed(value: Any, key: str, optional: bool = False) -> None:
    check_int(value, key, 0, optional)
    if value is not None and value > MAX_SEED:
        raise ConfigError(f"{key}={value} must be at most {MAX_SEED}")


def check_num_workers(value: Any, key: str) -> None:
    if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ConfigError(f"{key}={value!r} must be 'auto' or an integer >= 0")


def check_range(value: float | None, key: str, low: float, high: float, text: str) -> None:
    """`text` states the range as the user reads it, e.g. '(0, 1]'; low and high are inclusive."""
    if value is not None and not low <= value <= high:
        raise ConfigError(f"{key}={value} must be in {text}")


# --- backbone ---------------------------------------------------------------------------------------


@dataclass
class BackboneConfig:
    source: str = "torchvision"  # a module of transferlab.backbones.sources (torchvision, timm, ...)
    name: str = MISSING  # a model of that source
    weights: str | None = "DEFAULT"  # a weights name of the source, a local file, or null (random init)
    trust_file: bool = False  # true: load a local weights file with full unpickling (files you trust only)
    # batch norm's running-average momentum in training: auto = 0.1 (PyTorch's default) when the backbone
    # starts from random weights, else the architecture's own (torchvision's MobileNetV3 uses 0.01, tuned for
    # 600-epoch ImageNet runs: after a short run from scratch its statistics still describe the early
    # network, and evaluation predicts one class); null = the architecture's own; or a number in (0, 1]
    bn_momentum: Any = "auto"

    def __post_init__(self) -> None:
        value = self.bn_momentum
        if value in (None, "auto"):
            return
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise ConfigError(f"backbone.bn_momentum={value!r} must be auto, null or a number in (0, 1]")

    def resolved_bn_momentum(self) -> float | None:
        """The momentum to set, or None to keep the architecture's own."""
        if self.bn_momentum == "auto":
            return 0.1 if self.weights is None else None
        return self.bn_momentum


# --- head -------------------------------------------------------------------------------------------


@dataclass
class HeadConfig:
    _target_: str = MISSING
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"head.dropout={self.dropout} must be in [0, 1)")


@dataclass
class LinearHeadConfig(HeadConfig):
    """One linear layer on the pooled features (optional dropout first)."""

    _target_: str = "transferlab.models.heads.LinearHead"


@dataclass
class MLPHeadConfig(HeadConfig):
    """Linear(hidden_dim) -> ReLU -> Dropout -> Linear."""

    _target_: str = "transferlab.models.heads.MLPHead"
    hidden_dim: int = 256
    dropout: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.hidden_dim, "head.hidden_dim", 1)


@dataclass
class GAPHeadConfig(HeadConfig):
    """Global average pooling over the backbone's unpooled feature map (ViT: its patch tokens), then a
    linear layer."""

    _target_: str = "transferlab.models.heads.GlobalAvgPoolHead"


@dataclass
class AttentionHeadConfig(HeadConfig):
    """Attention pooling over the feature map's positions (a learned query per head), then a linear layer."""

    _target_: str = "transferlab.models.heads.AttentionPoolHead"
    num_heads: int = 1  # must divide the backbone's channel count

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.num_heads, "head.num_heads", 1)


# --- optim ------------------------------------------------------------------------------------------


PRETRAINED_BACKBONE_LR_MULT = 0.1  # optim.backbone_lr_mult=auto with pretrained weights (the earlier default)


@dataclass
class OptimConfig:
    """Our keys; each subclass adds its optimizer's own keyword arguments."""

    OURS: ClassVar[tuple[str, ...]] = (
        "_target_",
        "backbone_lr_mult",
        "layer_decay",
        "no_decay_norm_bias",
        "extra",
    )
    _target_: str = MISSING  # a torch.optim.Optimizer class; sgd, adam, adamw, rmsprop have their own schema
    lr: float = MISSING  # the head's learning rate; backbone stages scale it
    weight_decay: float = 0.0
    # backbone LR = lr * this. 1: one LR for every layer, with freeze.bn=train the best measured on real
    # ImageNet weights and on a small related source (experiments/imagenet_transfer); auto (the default
    # until then, kept for the configs and checkpoints that name it): PRETRAINED_BACKBONE_LR_MULT with
    # pretrained weights, 1 from scratch
    backbone_lr_mult: Any = 1.0
    layer_decay: float | None = (
        None  # in (0, 1]: stage i of n gets lr * backbone_lr_mult * layer_decay ** (n - i)
    )
    no_decay_norm_bias: bool = True  # no weight decay on biases and normalisation weights
    extra: dict[str, Any] = field(
        default_factory=dict
    )  # more keyword arguments of the class, e.g. {amsgrad: true}

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr!r} must be a positive number")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay={self.weight_decay} must be >= 0")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(
                f"optim.layer_decay={self.layer_decay!r} must be in (0, 1], or null for no decay"
            )
        if self.backbone_lr_mult != "auto" and (
            not isinstance(self.backbone_lr_mult, int | float)
            or isinstance(self.backbone_lr_mult, bool)
            or self.backbone_lr_mult < 0
        ):
            raise ConfigError(
                f"optim.backbone_lr_mult={self.backbone_lr_mult!r} must be 'auto' or a number >= 0"
            )

    def resolve_backbone_lr_mult(self, pretrained: bool) -> None:
        """`auto`: pretrained features adapt at a tenth of the new head's LR (at the head's LR they are
        erased in the first steps: experiments/imagenet_transfer); a random backbone learns at the head's."""
        if self.backbone_lr_mult == "auto":
            self.backbone_lr_mult = PRETRAINED_BACKBONE_LR_MULT if pretrained else 1.0

    def optimizer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the torch optimizer: every field that is not ours, and `extra`."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.OURS}
        return {**own, **self.extra}


@dataclass
class SGDConfig(OptimConfig):
    """SGD with Nesterov momentum: the classic CNN fine-tuning optimizer."""

    _target_: str = "torch.optim.SGD"
    lr: float = 0.01
    momentum: float = 0.9  # in [0, 1): at 1 or above the velocity never decays and training diverges
    nesterov: bool = True
    weight_decay: float = 1.0e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum={self.momentum} must be in [0, 1)")


@dataclass
class AdamConfig(OptimConfig):
    """Adam: weight decay as L2 in the gradient."""

    _target_: str = "torch.optim.Adam"
    lr: float = 1.0e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8


@dataclass
class AdamWConfig(AdamConfig):
    """AdamW: decoupled weight decay; the default for transformers and ConvNeXt."""

    _target_: str = "torch.optim.AdamW"
    lr: float = 3.0e-4
    weight_decay: float = 0.05


@dataclass
class RMSpropConfig(OptimConfig):
    """RMSprop: the optimizer of the MobileNet/EfficientNet recipes."""

    _target_: str = "torch.optim.RMSprop"
    lr: float = 1.0e-3
    alpha: float = 0.9
    momentum: float = 0.9
    eps: float = 1.0e-3
    weight_decay: float = 1.0e-5


# --- scheduler --------------------------------------------------------------------------------------


@dataclass
class SchedulerConfig:
    name: str = MISSING


@dataclass
class ConstantScheduleConfig(SchedulerConfig):
    name: str = "none"


@dataclass
class CosineScheduleConfig(SchedulerConfig):
    """Linear warmup, then cosine decay; stepped every optimizer step."""

    name: str = "cosine"
    warmup_epochs: float = 1.0  # may be fractional
    warmup_start_ratio: float = 0.01  # warmup starts at lr * this
    min_lr_ratio: float = 0.01  # cosine ends at lr * this

    def __post_init__(self) -> None:
        if self.warmup_epochs < 0:
            raise ConfigError(f"scheduler.warmup_epochs={self.warmup_epochs} must be >= 0")
        check_range(self.warmup_start_ratio, "scheduler.warmup_start_ratio", 0.0, 1.0, "[0, 1]")
        check_range(self.min_lr_ratio, "scheduler.min_lr_ratio", 0.0, 1.0, "[0, 1]")


@dataclass
class OneCycleScheduleConfig(SchedulerConfig):
    """OneCycleLR's curve: lr/div_factor up to lr over pct_start, then down to lr/(div_factor*final_div_factor)."""

    name: str = "onecycle"
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1.0e4

    def __post_init__(self) -> None:
        check_range(self.pct_start, "scheduler.pct_start", 0.0, 1.0, "[0, 1]")
        for key in ("div_factor", "final_div_factor"):
            if getattr(self, key) < 1:
                raise ConfigError(f"scheduler.{key}={getattr(self, key)} must be >= 1")


@dataclass
class StepScheduleConfig(SchedulerConfig):
    """Multiply the learning rate by gamma every step_size epochs."""

    name: str = "step"
    step_size: int = 10
    gamma: float = 0.1

    def __post_init__(self) -> None:
        check_int(self.step_size, "scheduler.step_size", 1)
        check_range(self.gamma, "scheduler.gamma", 0.0, 1.0, "[0, 1]")


@dataclass
class PlateauScheduleConfig(SchedulerConfig):
    """Multiply the learning rate by `factor` when the monitored metric stops improving."""

    name: str = "plateau"
    monitor: str = MISSING  # the preset sets ${optimized_metric}
    mode: str | None = None  # min | max; null = the metric's better direction (min for val/loss)
    factor: float = 0.1
    patience: int = 3  # epochs without improvement before the reduction

    def __post_init__(self) -> None:
        if self.mode is not None:
            check_choice(self.mode, "scheduler.mode", ("min", "max"))
        check_monitored_metric(self.monitor, "scheduler.monitor", self.mode, "scheduler.mode")
        check_range(self.factor, "scheduler.factor", 0.0, 1.0, "[0, 1]")
        check_int(self.patience, "scheduler.patience", 0)


# --- freeze -----------------------------------------------------------------------------------------

BN_MODES = ("adapt", "train", "eval", "auto")


@dataclass
class FreezeConfig:
    name: str = MISSING
    # batch norm in trainable stages: adapt (from pretrained weights: keep their statistics when the training
    # images fit them, update them when not, measured before training (finetune/bn_fit.py); from random
    # weights: update), train (update), eval (keep), auto (the first default: keep from pretrained weights,
    # update from random ones; kept for the configs and checkpoints that name it)
    bn: str = "adapt"

    def __post_init__(self) -> None:
        check_choice(self.bn, "freeze.bn", BN_MODES)


@dataclass
class FullFinetuneConfig(FreezeConfig):
    """Every backbone stage trains from the first step."""

    name: str = "full"


@dataclass
class LinearProbeConfig(FreezeConfig):
    """The backbone is a frozen feature extractor (batch norm statistics too); only the head trains."""

    name: str = "linear_probe"
    bn: str = "eval"


@dataclass
class PartialFinetuneConfig(FreezeConfig):
    """The last `trainable_blocks` backbone stages train, the earlier ones never."""

    name: str = "partial"
    trainable_blocks: int = 1  # counted from the top; 0 = linear probe

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.trainable_blocks, "freeze.trainable_blocks", 0)


@dataclass
class GradualUnfreezeConfig(FreezeConfig):
    """Head only until the first milestone, then `unfreeze_per_milestone` more stages at each one."""

    name: str = "gradual"
    milestones: list[int] = field(default_factory=lambda: [2, 5])  # epochs; the last unfreezes all
    unfreeze_per_milestone: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.milestones:
            raise ConfigError("freeze=gradual needs freeze.milestones, e.g. freeze.milestones=[2,5]")
        for value in self.milestones:
            check_int(value, "freeze.milestones entry", 1)
        if any(b <= a for a, b in itertools.pairwise(self.milestones)):
            raise ConfigError(f"freeze.milestones={list(self.milestones)} must be strictly increasing epochs")
        check_int(self.unfreeze_per_milestone, "freeze.unfreeze_per_milestone", 1)


# --- data -------------------------------------------------------------------------------------------

IMBALANCE_OPTIONS = ("none", "class_weights", "sampler", "focal")
SCAN_MODES = ("fast", "full")  # fast: headers + cheap checks; full: decode every file
EMPTY_CLASS_POLICIES = ("error", "drop")
PIL_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit (1024 * 1024 * 1024 // 4 // 3)


MIN_IMAGE_SIZE = 8  # the digits' own size; below it the antialiased resize itself fails (size 1)
IMAGE_FOLDER_ONLY = "it applies to data=imagefolder only"


@dataclass
class DataConfig:
    # keys of the base that this dataset does not read, with why: a value set for one is refused
    UNREAD: ClassVar[dict[str, str]] = {}
    name: str = MISSING
    root: str | None = None
    classes: Any = None  # keep a subset of classes: names or ids, e.g. [5,6,7,8,9]
    shots: int | None = None  # keep N training images per class (few-shot)
    shots_seed: int | None = None  # which N images; null = the run's seed
    split_seed: int = 0  # the stratified splits we make are fixed by this seed
    val_fraction: float = 0.2  # held out from train when the data has no val split
    test_fraction: float = 0.0  # > 0 and the data has no test split: hold out this stratified share as test
    image_size: int | None = None  # crop size; null = what the backbone's weights expect
    mean: list[float] | None = None  # normalisation; null = the weights' mean/std
    std: list[float] | None = None
    interpolation: str | None = None  # null = the weights' interpolation
    batch_size: int = 32
    # a training set smaller than this many batches is drawn several times per epoch (reshuffled each
    # pass), so that 10 epochs of 20 labelled images are 200 optimizer steps, not 10; 0 = one pass
    min_batches_per_epoch: int = 20
    num_workers: Any = "auto"  # auto = usable cores (per training process) - 1, at most 16; or a number
    imbalance: str = "none"  # none | class_weights (weighted loss) | sampler (weighted sampler) | focal
    class_fraction: Any = None  # keep a fraction of some classes' training images, e.g. {3: 0.1}
    # what augmentation must respect, because it would change an image's label:
    allow_hflip: bool = True  # false: never flip horizontally
    min_crop_scale: float | None = None  # random crops keep at least this share of the image area
    # image folders: the scan before training
    scan: str = "fast"  # fast: headers + cheap checks; full: decode every file
    skip_bad: bool = False  # true: skip bad files (listed in bad_files.txt); false: stop
    empty_classes: str = "error"  # error | drop: a class folder without usable images
    max_image_pixels: int = PIL_MAX_PIXELS  # larger images are bad files, never decoded

    def __post_init__(self) -> None:
        check_int(self.batch_size, "data.batch_size", 1)
        check_int(self.min_batches_per_epoch, "data.min_batches_per_epoch", 0)
        check_int(self.shots, "data.shots", 1, optional=True)
        check_seed(self.split_seed, "data.split_seed")
        check_seed(self.shots_seed, "data.shots_seed", optional=True)
        check_int(self.image_size, "data.image_size", MIN_IMAGE_SIZE, optional=True)
        check_int(self.max_image_pixels, "data.max_image_pixels", 1)
        check_num_workers(self.num_workers, "data.num_workers")
        check_choice(self.imbalance, "data.imbalance", IMBALANCE_OPTIONS)
        check_choice(self.scan, "data.scan", SCAN_MODES)
        check_choice(self.empty_classes, "data.empty_classes", EMPTY_CLASS_POLICIES)
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is not None and len(values) != 3:
                raise ConfigError(f"data.{key}={list(values)} must have 3 values (R, G, B)")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"data.std={list(self.std)} must be positive (images are divided by it)")
        if self.min_crop_scale is not None and not 0 < self.min_crop_scale <= 1:
            raise ConfigError(f"data.min_crop_scale={self.min_crop_scale} must be in (0, 1]")
        if self.classes is not None and (not isinstance(self.classes, list) or len(self.classes) < 2):
            raise ConfigError(
                f"data.classes={self.classes!r} must list at least 2 classes, or be null for all of them"
            )
        if self.interpolation is not None:
            self.interpolation = self.interpolation.lower()  # BICUBIC as bicubic, as torchvision reads it
            check_choice(self.interpolation, "data.interpolation", INTERPOLATIONS)
        self._check_fractions()
        self._check_class_fraction()
        self._check_unread()
        if self.root:  # kept absolute: eval.py and resume= may run from another folder
            self.root = os.path.abspath(os.path.expanduser(self.root))

    def _check_unread(self) -> None:
        for key, why in self.UNREAD.items():
            if is_set(self, key, DataConfig):
                raise ConfigError(f"data.{key}={getattr(self, key)!r} is not read by data={self.name}: {why}")

    def _check_fractions(self) -> None:
        val, test = self.val_fraction, self.test_fraction
        if not 0 < val < 1 or not 0 <= test < 1 or val + test >= 1:
            raise ConfigError(
                f"data.val_fraction={val} and data.test_fraction={test}: each must be in [0, 1) (val > 0), "
                "their sum below 1"
            )

    def _check_class_fraction(self) -> None:
        """Its classes are checked against the data's when the data is read (datasets._cut_classes)."""
        fractions = self.class_fraction
        if fractions is None:
            return
        if not isinstance(fractions, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1 for v in fractions.values()
        ):
            raise ConfigError(
                f"data.class_fraction={fractions!r} must map classes to fractions in (0, 1], e.g. {{3: 0.1}}"
            )


@dataclass
class DigitsConfig(DataConfig):
    """scikit-learn's handwritten digits: 1797 real 8x8 grayscale images of 10 classes, shipped offline."""

    UNREAD: ClassVar[dict[str, str]] = {
        "root": "its images are built in (scikit-learn's digits); for your own images use "
        "data=imagefolder data.root=<folder>",
        **dict.fromkeys(("scan", "skip_bad", "empty_classes", "max_image_pixels"), IMAGE_FOLDER_ONLY),
    }
    name: str = "digits"
    test_fraction: float = 0.2  # fixed stratified train/val/test split (60/20/20) by data.split_seed
    image_size: int | None = 32  # upsampled from 8x8; 224 would only cost time
    num_workers: Any = 0  # in memory: workers add only overhead
    allow_hflip: bool = False  # a mirrored digit is another glyph
    min_crop_scale: float | None = 0.8  # a smaller crop of an 8x8 digit cuts strokes off


@dataclass
class Cifar10Config(DataConfig):
    """torchvision's CIFAR-10 (60k 32x32 images, 10 classes) under data.root; downloaded when missing."""

    UNREAD: ClassVar[dict[str, str]] = dict.fromkeys(
        ("scan", "skip_bad", "empty_classes", "max_image_pixels"), IMAGE_FOLDER_ONLY
    )
    name: str = "cifar10"
    download: bool = True
    val_fraction: float = 0.1  # held out from the 50k training images, stratified

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.test_fraction:
            raise ConfigError(
                f"data.test_fraction={self.test_fraction}: CIFAR-10 has its own test split; leave it at 0"
            )


@dataclass
class ImageFolderConfig(DataConfig):
    """Your images: root/train/<class>/ (optional val/, test/), or root/<class>/ split by us."""

    name: str = "imagefolder"
    root: str | None = MISSING  # the folder of your images

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.root:
            raise ConfigError("data.root must be set for data=imagefolder: data.root=/path/to/images")


@dataclass
class UnlabeledConfig(DataConfig):
    """Images without labels, for pretrain.py: every image under root, in any sub-folders (class folders
    are allowed and ignored)."""

    UNREAD: ClassVar[dict[str, str]] = dict.fromkeys(
        ("classes", "shots", "shots_seed", "test_fraction", "imbalance", "class_fraction", "empty_classes"),
        "its images have no classes (every image under data.root, one unlabelled set, a val share held out)",
    )
    name: str = "unlabeled"
    root: str | None = MISSING  # the folder of your images
    val_fraction: float = 0.05  # held out to report the pretraining loss on images it does not train on

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.root:
            raise ConfigError("data.root must be set for data=unlabeled: data.root=/path/to/images")


# --- augment ----------------------------------------------------------------------------------------

AUTOAUGMENT_POLICIES = ("imagenet", "cifar10", "svhn")
MAGNITUDE_BINS = 31  # torchvision's RandAugment and TrivialAugmentWide: magnitudes 0..30


@dataclass
class AugmentConfig:
    name: str = MISSING
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # RandomResizedCrop area range
    hflip: bool = True  # random horizontal flip, unless the data forbids it (data.allow_hflip=false)
    mixup_alpha: float = 0.0  # > 0: mixup on training batches, weight ~ Beta(alpha, alpha); soft targets
    cutmix_alpha: float = 0.0  # > 0: cutmix; with both > 0, each batch gets one of the two

    def __post_init__(self) -> None:
        scale = list(self.crop_scale)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"augment.crop_scale={scale} must be [low, high] with 0 < low <= high <= 1")
        for key in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, key) < 0:
                raise ConfigError(f"augment.{key}={getattr(self, key)} must be >= 0 (0 turns it off)")


@dataclass
class NoAugmentConfig(AugmentConfig):
    """Training images are resized and center-cropped exactly like evaluation images."""

    name: str = "none"


@dataclass
class BasicAugmentConfig(AugmentConfig):
    """Random resized crop + horizontal flip."""

    name: str = "basic"


@dataclass
class RandAugmentConfig(AugmentConfig):
    """Basic, then RandAugment: num_ops random operations of the same magnitude."""

    name: str = "randaugment"
    num_ops: int = 2
    magnitude: int = 9  # 0..30

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.num_ops, "augment.num_ops", 0)
        if not 0 <= self.magnitude < MAGNITUDE_BINS:
            raise ConfigError(f"augment.magnitude={self.magnitude} must be in 0..{MAGNITUDE_BINS - 1}")


@dataclass
class TrivialAugmentConfig(AugmentConfig):
    """Basic, then TrivialAugmentWide: one random operation of random magnitude."""

    name: str = "trivialaugment"


@dataclass
class AutoAugmentConfig(AugmentConfig):
    """Basic, then AutoAugment's learned policy."""

    name: str = "autoaugment"
    policy: str = "imagenet"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.policy, "augment.policy", AUTOAUGMENT_POLICIES)


# --- keys at the top level of train.yaml --------------------------------------------------------------


@dataclass
class LossConfig:
    label_smoothing: float = 0.0  # also applied to mixup/cutmix soft targets
    focal_gamma: float = 2.0  # data.imbalance=focal: (1 - p)^gamma down-weights easy images

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"loss.label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.focal_gamma < 0:
            raise ConfigError(f"loss.focal_gamma={self.focal_gamma} must be >= 0")


@dataclass
class ModelConfig:
    compile: bool = False  # torch.compile the backbone (slow first batches; for long GPU runs)
    channels_last: bool = False  # NHWC weights and inputs: faster convolutions on GPUs with mixed precision
    # auto | true | false: train the head on the backbone's features computed once per split (in memory),
    # not on images every epoch. Valid when the backbone never trains (freeze=linear_probe, or partial with
    # trainable_blocks=0), training images are not random (augment=none, no mixup/cutmix), the backbone
    # draws no random numbers (no dropout / stochastic depth) and the run is one process. auto: on exactly
    # then; true: refused otherwise, saying why; false: off. Same metrics either way
    # (finetune/feature_cache.py).
    cache_features: Any = "auto"

    def __post_init__(self) -> None:
        if not (isinstance(self.cache_features, bool) or self.cache_features == "auto"):
            raise ConfigError(
                f"model.cache_features={self.cache_features!r} is not valid; choose one of: auto, true, false"
            )


@dataclass
class EMAConfig:
    """`ema.*`: an exponential moving average of the weights, updated after every optimizer step, is what
    validation measures, best.ckpt / last.ckpt hold as their state_dict (the model eval, predict and export
    load) and what the run is tested with; resume= continues it (finetune/averaging.py)."""

    enabled: bool = False
    decay: float = 0.999  # the average keeps this share of itself at each update (after the warm-up)
    # true: decay_t = min(decay, (1 + n) / (10 + n)) after n updates, so that early on the average follows
    # the weights and a short fine-tune is not averaged toward its first weights; false: decay from the start
    warmup: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.decay, bool) or not isinstance(self.decay, int | float) or not 0 < self.decay < 1:
            raise ConfigError(f"ema.decay={self.decay!r} must be in (0, 1), e.g. 0.999")
        if not self.enabled:
            for key in ("decay", "warmup"):
                if is_set(self, key):
                    raise ConfigError(f"ema.{key} is read only with ema.enabled=true (it is false)")


@dataclass
class DistillConfig:
    """`distill.*`: knowledge distillation from a teacher (a checkpoint of ours for the same classes) into
    the network this run trains: loss = alpha * loss(labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)
    on every training batch (models/distill.py). Validation and test measure the student alone; its
    checkpoints hold no teacher."""

    teacher: str | None = (
        None  # a checkpoint of ours, e.g. a bigger model's best.ckpt; null = no distillation
    )
    alpha: float = 0.5  # the labels' share of the loss; 1 - alpha is the teacher's
    temperature: float = 4.0  # T: softens both distributions; the teacher's term is scaled by T^2
    trust_teacher: bool = False  # load the teacher with full unpickling (files you trust only)

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not 0 <= self.alpha < 1:
            raise ConfigError(f"distill.alpha={self.alpha!r} must be in [0, 1): 1 would ignore the teacher")
        temperature = self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature <= 0:
            raise ConfigError(f"distill.temperature={temperature!r} must be a positive number, e.g. 4")
        if self.teacher is not None:  # as data.root: the same file from wherever eval or resume runs
            self.teacher = os.path.abspath(os.path.expanduser(self.teacher))
        if self.teacher is None:
            for key in ("alpha", "temperature", "trust_teacher"):
                if is_set(self, key):
                    raise ConfigError(
                        f"distill.{key} is read only with distill.teacher=<checkpoint> (it is null)"
                    )


@dataclass
class TuneConfig:
    lr_find: bool = False  # run Lightning's LR finder first and train with its suggestion as optim.lr
    min_lr: float = 1.0e-6  # range of the test
    max_lr: float = 1.0
    num_training: int = 100  # LRs tried, one batch each
    mode: str = "exponential"  # or linear spacing

    def __post_init__(self) -> None:
        if not 0 < self.min_lr < self.max_lr:
            raise ConfigError(
                f"tune.min_lr={self.min_lr!r} and tune.max_lr={self.max_lr!r} must satisfy 0 < min_lr < max_lr"
            )
        check_int(self.num_training, "tune.num_training", 2)
        check_choice(self.mode, "tune.mode", ("exponential", "linear"))


@dataclass
class PathsConfig:
    output_root: str = "outputs"  # runs in <output_root>/runs/<time>_<id>/, sweeps in <output_root>/multirun/
    data_dir: str = "data"  # where downloaded datasets go
    output_dir: str = "${hydra:runtime.output_dir}"  # this run's directory


@dataclass
class TrainConfig:
    """The top-level keys of train.yaml; the groups are composed beside them."""

    task_name: str = "train"
    seed: int = 42
    optimized_metric: str = "val/acc"  # what best.ckpt is chosen by and what train() returns to sweepers
    optimized_mode: str = "${metric_mode:${optimized_metric}}"  # follows the metric (min for val/loss)
    ckpt_path: str | None = None  # start a new run from this checkpoint's full state
    resume: str | None = None  # a run directory: continue that run (its config, last.ckpt, directory)
    # start from this checkpoint's network: its architecture (a pruned one's widths included) and weights,
    # with a new optimizer, schedule and epoch count (e.g. the recovery fine-tune of `optimize method=prune`)
    init_from: str | None = None
    test_after_fit: bool = True  # test the best checkpoint when the data has a test split
    # fit a temperature on the val split to the best checkpoint's logits (LBFGS on the NLL) and store it
    # in best.ckpt: predict, export and analyze use it; metrics.json gets the ECE before and after
    calibrate: bool = False
    loss: LossConfig = field(default_factory=LossConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)  # weight averaging; off by default
    distill: DistillConfig = field(default_factory=DistillConfig)  # knowledge distillation; off by default
    # groups (conf/<group>/): typed by their own options' schemas
    backbone: Any = MISSING
    head: Any = MISSING
    optim: Any = MISSING
    scheduler: Any = MISSING
    freeze: Any = MISSING
    data: Any = MISSING
    augment: Any = MISSING
    trainer: Any = MISSING  # Lightning's Trainer arguments
    logger: Any = None  # {name: a Lightning logger config}
    callbacks: Any = None  # {name: a Lightning callback config}
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        check_seed(self.seed, "seed")
        if self.init_from is not None and (self.ckpt_path is not None or self.resume is not None):
            raise ConfigError(
                "init_from starts a new run from a checkpoint's network; ckpt_path and resume continue a run's "
                "full state: give one of them"
            )
        check_choice(self.optimized_mode, "optimized_mode", ("max", "min"))
        check_monitored_metric(
            self.optimized_metric, "optimized_metric", self.optimized_mode, "optimized_mode"
        )


@dataclass
class EvalConfig:
    """The top-level keys of eval.yaml."""

    task_name: str = "eval"
    ckpt_path: str | None = None  # a checkpoint of ours (outputs/runs/<run>/checkpoints/best.ckpt), or:
    # an exported or quantized model.onnx / model.int8.onnx / model.pt with its model.json beside it, tested on
    # the split of the data its source checkpoint (model.json's source_checkpoint, which must be in place)
    # would be tested on, with the card's preprocessing; trainer.* and logger are not read then
    model_path: str | None = None
    split: str = "test"  # train | val | test
    seed: int = 42
    trust_checkpoint: bool = False  # true loads the checkpoint with full unpickling (files you trust only)
    data: Any = MISSING  # the checkpoint's data config, with any key given here on top
    trainer: Any = MISSING
    logger: Any = None
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        if (self.ckpt_path is None) == (self.model_path is None):
            raise ConfigError(
                "give one of ckpt_path=<checkpoint> or model_path=<exported model file> "
                f"(got {'both' if self.ckpt_path is not None else 'neither'})"
            )
        check_seed(self.seed, "seed")
        check_choice(self.split, "split", SPLITS)


# --- pretrain.py: its self-supervised methods, each keyed by its name (autoencoder.*, simclr.*) ---------

CORRUPTIONS = ("none", "noise", "mask")


@dataclass
class AutoencoderConfig:
    """A convolutional autoencoder: the backbone's last feature map, decoded back to the image; trained on
    min ||x - D(E(corrupt(x)))||^2 (the clean image is the target)."""

    name: str = "autoencoder"  # kept with the keys in checkpoints, which hold the chosen method's only
    # none | noise (denoising: Gaussian noise of noise_std, in normalised units) | mask (square patches of
    # mask_patch pixels blanked with probability mask_ratio)
    corruption: str = "none"
    noise_std: float = 0.5
    mask_ratio: float = 0.5
    mask_patch: int = 4
    decoder_min_channels: int = 32  # each upsampling block halves the channels, down to this

    def __post_init__(self) -> None:
        check_choice(self.corruption, "autoencoder.corruption", CORRUPTIONS)
        if self.noise_std <= 0:
            raise ConfigError(f"autoencoder.noise_std={self.noise_std} must be > 0")
        if not 0 < self.mask_ratio < 1:
            raise ConfigError(f"autoencoder.mask_ratio={self.mask_ratio} must be in (0, 1)")
        check_int(self.mask_patch, "autoencoder.mask_patch", 1)
        check_int(self.decoder_min_channels, "autoencoder.decoder_min_channels", 1)


@dataclass
class SimCLRConfig:
    """SimCLR (Chen et al., 2020) with lightly's projection head and NT-Xent loss: two random views of each
    image are pulled together, the batch's other images pushed apart."""

    name: str = "simclr"
    temperature: float = 0.2  # of the NT-Xent loss
    hidden_dim: int = 512  # projection head: Linear(features, hidden) -> BN -> ReLU -> Linear(hidden, out)
    projection_dim: int = 128
    # the views: random resized crop of this scale range, flip (unless data.allow_hflip=false), colour
    # jitter of this strength with probability 0.8, grayscale with probability grayscale_p
    crop_scale: tuple[float, float] = (0.2, 1.0)
    color_jitter: float = 0.4
    grayscale_p: float = 0.2

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"simclr.temperature={self.temperature} must be > 0")
        check_int(self.hidden_dim, "simclr.hidden_dim", 1)
        check_int(self.projection_dim, "simclr.projection_dim", 1)
        self.crop_scale = tuple(float(v) for v in self.crop_scale)  # a list from YAML
        if len(self.crop_scale) != 2:
            raise ConfigError(f"simclr.crop_scale={list(self.crop_scale)} must be [low, high] in (0, 1]")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"simclr.crop_scale={list(self.crop_scale)} must be [low, high] in (0, 1]")
        if not 0 <= self.color_jitter <= 1 or not 0 <= self.grayscale_p <= 1:
            raise ConfigError("simclr.color_jitter and simclr.grayscale_p must be in [0, 1]")


PRETRAIN_METHODS: dict[str, type] = {"autoencoder": AutoencoderConfig, "simclr": SimCLRConfig}


@dataclass
class PretrainConfig:
    """The top-level keys of pretrain.yaml: learn a backbone from unlabelled images."""

    task_name: str = "pretrain"
    seed: int = 42
    optimized_metric: str = "val/loss"  # best.ckpt is the lowest pretraining loss on held-out images
    optimized_mode: str = "min"
    ckpt_path: str | None = None  # continue from this checkpoint's full state
    resume: str | None = None  # a run directory: continue that run (its config, last.ckpt, directory)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: str = "autoencoder"  # autoencoder | simclr: its keys are autoencoder.* or simclr.*
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    backbone: Any = MISSING
    optim: Any = MISSING
    scheduler: Any = MISSING
    data: Any = MISSING
    augment: Any = MISSING  # the autoencoder's; simclr makes its own views (simclr.*)
    trainer: Any = MISSING
    logger: Any = None
    callbacks: Any = None
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        check_seed(self.seed, "seed")
        check_choice(self.method, "method", tuple(PRETRAIN_METHODS))
        for name in PRETRAIN_METHODS:
            if self.method != name and (is_set(self, name) or typed_under(name)):
                raise ConfigError(f"{name}.* is read only with method={name} (method={self.method})")
        if self.method == "autoencoder":  # here, not in AutoencoderConfig: its default is built first
            self._check_corruption_keys()
        if (self.optimized_metric, self.optimized_mode) != ("val/loss", "min"):
            raise ConfigError(
                f"optimized_metric={self.optimized_metric} / optimized_mode={self.optimized_mode}: pretraining "
                "logs val/loss only (lower is better); leave both unset"
            )

    def _check_corruption_keys(self) -> None:
        """A corruption's setting typed for another corruption would not be read. Typed only: a checkpoint
        saved before this check may hold such a value, and must still load."""
        corruption = self.autoencoder.corruption
        for key, reads in (("noise_std", "noise"), ("mask_ratio", "mask"), ("mask_patch", "mask")):
            if corruption != reads and typed_under(f"autoencoder.{key}"):
                raise ConfigError(
                    f"autoencoder.{key} is read only with autoencoder.corruption={reads} (corruption={corruption})"
                )

    @property
    def method_config(self) -> AutoencoderConfig | SimCLRConfig:
        """The chosen method's keys."""
        return getattr(self, self.method)


# --- the tools' own keys (conf/<tool>.yaml) -----------------------------------------------------------


@dataclass
class SummaryConfig:
    """`transferlab summary`: the table of a sweep."""

    sweep_dir: str = MISSING  # a multirun directory, e.g. outputs/multirun/<time>_<id>
    metric: str | None = None  # sort by this metric; null = the sweep's optimized_metric
    mode: str | None = None  # max | min; null = the metric's better direction (min for a loss)
    out: str | None = None  # where summary.csv and summary.md go; null = the sweep directory

    def __post_init__(self) -> None:
        if self.mode is not None:
            check_choice(self.mode, "mode", ("max", "min"))


TTA_MODES = ("none", "hflip", "five_crop")
EXPORT_FORMATS = ("onnx", "torchscript")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class PredictConfig:
    """`transferlab predict`: class probabilities for new images, from a checkpoint or an exported model."""

    task_name: str = "predict"
    ckpt_path: str | None = None  # a checkpoint of ours (outputs/runs/<run>/checkpoints/best.ckpt), or:
    model_path: str | None = None  # an exported model.onnx / model.pt, with its model.json beside it
    inputs: str = MISSING  # an image file, a folder (searched recursively), a glob, or a .txt of paths
    top_k: int = 1  # classes (with probabilities) per image in predictions.csv
    tta: str = "none"  # test-time augmentation, averaged probabilities: none | hflip | five_crop
    batch_size: int = 32
    num_workers: Any = "auto"  # loader processes: auto = usable cores - 1, at most 16; or a number
    write_json: bool = False  # also predictions.json
    device: str = "auto"  # auto (cuda when there is one) | cpu | cuda; for checkpoints and TorchScript
    trust_checkpoint: bool = False  # true loads the checkpoint with full unpickling (files you trust only)
    max_image_pixels: int = PIL_MAX_PIXELS  # larger images fail (reason in predict_errors.csv), never decoded
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        if (self.ckpt_path is None) == (self.model_path is None):
            raise ConfigError("give one of ckpt_path=<checkpoint> or model_path=<exported model file>")
        check_int(self.top_k, "top_k", 1)
        check_int(self.max_image_pixels, "max_image_pixels", 1)
        if self.model_path is not None and is_set(self, "trust_checkpoint"):  # no checkpoint is read
            raise ConfigError(
                "trust_checkpoint is read only with ckpt_path (model_path is an exported model)"
            )
        if self.model_path is not None and str(self.model_path).endswith(".onnx") and is_set(self, "device"):
            raise ConfigError(  # ONNX Runtime runs on the CPU
                "device is read only with ckpt_path or a TorchScript model_path (model_path is ONNX)"
            )
        check_int(self.batch_size, "batch_size", 1)
        check_choice(self.tta, "tta", TTA_MODES)
        check_choice(self.device, "device", DEVICES)
        check_num_workers(self.num_workers, "num_workers")


@dataclass
class ExportConfig:
    """`transferlab export`: a deployable model file with its model.json, parity-checked before success."""

    task_name: str = "export"
    ckpt_path: str = MISSING  # a checkpoint of ours
    format: str = "onnx"  # onnx | torchscript
    opset: int = 18  # ONNX opset (format=onnx)
    parity_images: int | None = 128  # images of the checkpoint's val split the check runs; null = all
    parity_atol: float = 1e-4  # largest absolute logit difference allowed (fp32)
    seed: int = 42
    trust_checkpoint: bool = False
    data: Any = MISSING  # the checkpoint's data config (for its val split), with any key given here on top
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        check_choice(self.format, "format", EXPORT_FORMATS)
        check_int(self.opset, "opset", 7)
        if self.format != "onnx" and is_set(self, "opset"):
            raise ConfigError(f"opset is read only with format=onnx (format={self.format})")
        check_int(self.parity_images, "parity_images", 1, optional=True)
        check_range(self.parity_atol, "parity_atol", 0.0, float("inf"), "[0, inf)")
        check_seed(self.seed, "seed")


PRUNE_IMPORTANCES = ("l1", "l2")  # the norm of a channel's weights that ranks it (torch-pruning's magnitude)


@dataclass
class PruneConfig:
    """`optimize method=prune`: structured (channel) pruning of the backbone by torch-pruning."""

    amount: float = 0.5  # fraction of the channels removed from every prunable backbone layer, in (0, 1)
    # {stage name: fraction}: prune only these stages, each by its own fraction, instead of every layer by
    # `amount` (a ResNet's stages: conv1+bn1, layer1 ... layer4; a wrong name lists them); null = every
    # stage. Typed Any for Hydra, which can neither merge `prune.stages={layer3: 0.5}` into a null dict node
    # nor add keys to an empty one; checked here instead
    stages: Any = None
    importance: str = "l1"  # l1 | l2: which channels go first, the smallest by this norm of their weights
    # batches of training images (evaluation transform, data.batch_size each) that re-estimate every batch
    # norm's statistics after pruning: what each layer receives has changed; 0 keeps the old statistics
    bn_batches: int = 16

    def __post_init__(self) -> None:
        check_fraction(self.amount, "prune.amount")
        if self.stages is not None:
            if not isinstance(self.stages, dict) or not self.stages:
                raise ConfigError(
                    f"prune.stages={self.stages!r} must name stages with their fractions, e.g. "
                    "prune.stages={layer3: 0.5}; null prunes every stage by prune.amount"
                )
            if is_set(self, "amount"):
                raise ConfigError(
                    f"prune.amount={self.amount} and prune.stages: set one (the stages have their own amounts)"
                )
            for name, amount in self.stages.items():
                check_fraction(amount, f"prune.stages.{name}")
        check_choice(self.importance, "prune.importance", PRUNE_IMPORTANCES)
        check_int(self.bn_batches, "prune.bn_batches", 0)


@dataclass
class RecoveryConfig:
    """`optimize method=prune`: the fine-tune that recovers the pruned network's accuracy, a training run of
    its own with the checkpoint's run config (<run>/.hydra/config.yaml), every stage training."""

    epochs: int = 5  # 0: prune only (the report then says what pruning alone costs)
    lr: float | None = None  # optim.lr of the fine-tune; null = the checkpoint's run's own

    def __post_init__(self) -> None:
        check_int(self.epochs, "finetune.epochs", 0)
        if self.epochs == 0 and self.lr is not None:
            raise ConfigError(
                "finetune.lr is read only with finetune.epochs > 0 (0: prune only, no fine-tune)"
            )
        if self.lr is not None and (
            isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or self.lr <= 0
        ):
            raise ConfigError(f"finetune.lr={self.lr!r} must be a positive number, or null for the run's own")


def check_fraction(value: Any, key: str) -> None:
    """A fraction strictly between 0 and 1 (neither nothing nor everything)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ConfigError(f"{key}={value!r} must be a fraction in (0, 1)")


OPTIMIZE_METHODS = ("quantize", "prune")
QUANT_FORMATS = ("qdq", "qoperator")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


@dataclass
class QuantizeConfig:
    """`optimize method=quantize`: int8 post-training static quantization by ONNX Runtime."""

    calibration_batches: int = 8  # batches of training images (data.batch_size each) the ranges come from
    # how activation ranges come from the calibration images: minmax (their extremes) | percentile (99.999th
    # percentile of |x|: an outlier widens no range) | entropy (the range keeping the histogram's KL smallest)
    calibration_method: str = "minmax"
    split: str | None = None  # where fp32 and int8 are compared: val | test; null = test if the data has one
    format: str = "qdq"  # qdq (QuantizeLinear/DequantizeLinear pairs) | qoperator (QLinearConv, ...)
    per_channel: bool = True  # one weight scale per output channel (per tensor: false)
    reduce_range: bool = False  # 7-bit weights: for CPUs without VNNI, where 8 bits can saturate
    # the first N Conv/Gemm/MatMul layers (graph order) stay fp32: the stem is what int8 hurts most (measured:
    # experiments/compression)
    fp32_first_layers: int = 0
    # rounds of timing (each: fp32, int8, int8, fp32 blocks of latency_runs per model); the speed-up is the
    # median of the rounds' own: a round that the machine's load changed in (a VM's neighbour) is outvoted
    latency_rounds: int = 5

    def __post_init__(self) -> None:
        check_int(self.calibration_batches, "quantize.calibration_batches", 1)
        check_int(self.latency_rounds, "quantize.latency_rounds", 1)
        if self.split is not None:
            check_choice(self.split, "quantize.split", ("val", "test"))
        check_choice(self.format, "quantize.format", QUANT_FORMATS)
        check_choice(self.calibration_method, "quantize.calibration_method", CALIBRATION_METHODS)
        check_int(self.fp32_first_layers, "quantize.fp32_first_layers", 0)


@dataclass
class OptimizeConfig:
    """`transferlab optimize`: a smaller or faster model from a checkpoint, with its measured trade-off."""

    task_name: str = "optimize"
    ckpt_path: str = MISSING  # a checkpoint of ours
    method: str = (
        "quantize"  # quantize (int8, ONNX Runtime) | prune (channels, torch-pruning, then fine-tuned)
    )
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)  # method=prune
    finetune: RecoveryConfig = field(default_factory=RecoveryConfig)  # method=prune: the recovery fine-tune
    # timed runs per model and batch size, after warm-up (quantize: per round, in two blocks, so rounded up
    # to even)
    latency_runs: int = 20
    # threads for the timings (quantize: ONNX Runtime's intra-op; prune: torch's); 0 = each one's default
    threads: int = 0
    seed: int = 42
    trust_checkpoint: bool = False
    data: Any = MISSING  # the checkpoint's data config, with any key given here on top
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        check_choice(self.method, "method", OPTIMIZE_METHODS)
        for group, method in (("quantize", "quantize"), ("prune", "prune"), ("finetune", "prune")):
            if self.method != method and (is_set(self, group) or typed_under(group)):
                raise ConfigError(f"{group}.* is read only with method={method} (method={self.method})")
        check_int(self.latency_runs, "latency_runs", 1)
        check_int(self.threads, "threads", 0)
        check_seed(self.seed, "seed")


@dataclass
class AnalyzeConfig:
    """`transferlab analyze`: what a checkpoint gets wrong on a split, as report/ and report.html."""

    task_name: str = "analyze"
    ckpt_path: str = MISSING
    split: str = "test"  # train | val | test
    top_losses: int = 16  # the most confidently wrong images in the gallery
    gradcam_images: int = 8  # images with Grad-CAM overlays (0 = none)
    calibration_bins: int = 15  # confidence bins of the ECE and the reliability diagram
    device: str = "auto"
    seed: int = 42
    trust_checkpoint: bool = False
    data: Any = MISSING  # the checkpoint's data config, with any key given here on top
    logger: Any = None  # {name: a Lightning logger config}: the report's images go there too
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        check_choice(self.split, "split", SPLITS)
        check_int(self.top_losses, "top_losses", 0)
        check_int(self.gradcam_images, "gradcam_images", 0)
        check_int(self.calibration_bins, "calibration_bins", 1)
        check_choice(self.device, "device", DEVICES)
        check_seed(self.seed, "seed")


DEMO_METHODS = (
    "imagenet_finetune",
    "imagenet_linear_probe",
    "imagenet_scratch",
    "digits_pretrained",
    "scratch",
    "linear_probe",
    "partial",
    "gradual",
    "lp_ft",
    "full",
    "full_discriminative",
    "full_layer_decay",
)


@dataclass
class DemoConfig:
    """`transferlab demo`: ImageNet transfer (and digits 0-4 pretraining) compared on digits 5-9 with few labels."""

    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])  # one target-task run per seed and method
    shots: int | None = None  # labelled images per target class; null = the recipe's (2)
    methods: list[str] = field(
        default_factory=lambda: [
            "imagenet_finetune",
            "imagenet_linear_probe",
            "imagenet_scratch",
            "digits_pretrained",
        ]
    )
    out: str | None = None  # the demo's directory; null = outputs/demo/<time>
    overrides: list[str] = field(default_factory=list)  # train.py overrides for every run

    def __post_init__(self) -> None:
        for method in self.methods:
            check_choice(method, "methods entry", DEMO_METHODS)
        check_int(self.shots, "shots", 1, optional=True)
        if not self.seeds:
            raise ConfigError("seeds must list at least one seed")
        if not self.methods:
            raise ConfigError(f"methods must list at least one of: {', '.join(DEMO_METHODS)}")
        for name, values in (("seeds", self.seeds), ("methods", self.methods)):
            if len(set(values)) < len(values):  # two runs would share one directory
                repeated = next(v for v in values if values.count(v) > 1)
                raise ConfigError(
                    f"{name} lists {repeated} twice: each run of the demo is one seed and method"
                )
