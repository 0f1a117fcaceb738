"""What Hydra composes with: the schemas in its ConfigStore, and our resolvers.

Tools call `register_configs()` before Hydra composes (`tools/app.py`); nothing registers on import.
Each YAML preset in `conf/<group>/` starts from `/schema/<group>@_here_: <option>`.
"""

from __future__ import annotations

import atexit
import secrets
import shutil
import tempfile
from dataclasses import fields, make_dataclass
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from transferlab.config import schema as s
from transferlab.runtime import slurm_run_name

# group -> option -> schema. The option's discriminating key (`name`, or `_target_` for classes that
# Hydra instantiates) tells which schema a plain mapping (a checkpoint's, a saved run's) belongs to.
OPTIONS: dict[str, dict[str, type]] = {
    "backbone": {"backbone": s.BackboneConfig},
    "head": {
        "linear": s.LinearHeadConfig,
        "mlp": s.MLPHeadConfig,
        "gap": s.GAPHeadConfig,
        "attention": s.AttentionHeadConfig,
    },
    "optim": {
        "sgd": s.SGDConfig,
        "adam": s.AdamConfig,
        "adamw": s.AdamWConfig,
        "rmsprop": s.RMSpropConfig,
        "custom": s.OptimConfig,  # any other torch.optim class: its arguments in optim.extra
    },
    "scheduler": {
        "none": s.ConstantScheduleConfig,
        "cosine": s.CosineScheduleConfig,
        "onecycle": s.OneCycleScheduleConfig,
        "step": s.StepScheduleConfig,
        "plateau": s.PlateauScheduleConfig,
    },
    "freeze": {
        "full": s.FullFinetuneConfig,
        "linear_probe": s.LinearProbeConfig,
        "partial": s.PartialFinetuneConfig,
        "gradual": s.GradualUnfreezeConfig,
    },
    "data": {
        "digits": s.DigitsConfig,
        "cifar10": s.Cifar10Config,
        "imagefolder": s.ImageFolderConfig,
        "unlabeled": s.UnlabeledConfig,  # pretrain.py only
    },
    "augment": {
        "none": s.NoAugmentConfig,
        "basic": s.BasicAugmentConfig,
        "randaugment": s.RandAugmentConfig,
        "trivialaugment": s.TrivialAugmentConfig,
        "autoaugment": s.AutoAugmentConfig,
    },
}
PRETRAIN_GROUPS = ("backbone", "optim", "scheduler", "data", "augment")
DISCRIMINATORS = {"head": "_target_", "optim": "_target_"}  # the others: `name` (backbone: one schema)
ALIASES = {"freeze": {"none": "full", "backbone": "linear_probe"}}  # the first release's names


CHECKPOINT_DATA = "from_checkpoint"  # data= of eval, export, optimize, analyze: the checkpoint's own data
# group options only some tools can use, and which: --help offers them to those alone
TOOLS_OF_OPTION = {
    ("data", CHECKPOINT_DATA): ("eval", "export", "optimize", "analyze"),
    ("data", "unlabeled"): ("pretrain",),  # no labels: train and the tools after it refuse it
}


def _data_overrides() -> type:
    """eval.py's `data` node: every key of every data schema, unset (null). What is set replaces the
    checkpoint's own data config; the keys come from the schemas, so this list is never kept by hand."""
    names = dict.fromkeys(f.name for option in OPTIONS["data"].values() for f in fields(option))
    return make_dataclass("DataOverrides", [(name, Any, None) for name in names])


_RUN_UID = secrets.token_hex(3)  # one per process: two runs started in the same second get two directories
_SCRATCH: list[str] = []


def scratch_dir() -> str:
    """`${scratch_dir:}`: a folder of this process's own, removed when it exits. The tools that write
    nothing (check) get their sweep there: Hydra writes each -m job a folder and the sweep's record."""
    if not _SCRATCH:
        _SCRATCH.append(tempfile.mkdtemp(prefix="transferlab_sweep_"))
        atexit.register(shutil.rmtree, _SCRATCH[0], ignore_errors=True)
    return _SCRATCH[0]


def tool_summary(tool: str) -> str:
    """`${tool_summary:${hydra.job.name}}` (conf/hydra/help/groups.yaml): the first paragraph of the tool
    module's docstring, --help's first lines (the README has the rest)."""
    import importlib

    try:
        doc = importlib.import_module(f"transferlab.tools.{tool}").__doc__ or ""
    except ImportError:  # a script of the user's own composing our configs
        return ""
    return doc.strip().split("\n\n")[0]


def tool_groups(tool: str, choices: Any) -> str:
    """`${tool_groups:${hydra.job.name},${hydra.runtime.choices}}` (conf/hydra/help/groups.yaml): --help's
    section on the config groups the tool's defaults list composed, a line each with the options Hydra
    finds for it that this tool can use (`TOOLS_OF_OPTION`), the chosen one in brackets; nothing for a
    tool without groups. Hydra's own groups and our schemas are left out: nobody picks them."""
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        return ""
    loader = GlobalHydra.instance().config_loader()
    lines = []
    for group, choice in sorted(choices.items()):
        if group.startswith(("hydra", "schema")) or "@" in group:
            continue
        options = [
            option
            for option in sorted(loader.get_group_options(group))
            if option == choice or tool in TOOLS_OF_OPTION.get((group, option), (tool,))
        ]
        lines.append(f"{group}: " + ", ".join(f"[{o}]" if o == choice else o for o in options))
    if not lines:
        return ""
    heading = "== Configuration groups ==\nCompose your configuration from these groups (group=option; [the default])"
    return "\n".join([heading, "", *lines, "", ""])


def register_resolvers() -> None:
    """`${run_uid:}`, `${slurm_or:NAME}`, `${or_else:A,B}`, `${if_set:X,A,B}` (conf/hydra/default.yaml);
    `${scratch_dir:}` (conf/hydra/tool.yaml); `${metric_mode:METRIC}` (the default of optimized_mode);
    `${tool_groups:...}`, `${tool_summary:...}` (conf/hydra/help/groups.yaml)."""
    resolvers = {
        "run_uid": lambda: _RUN_UID,
        "scratch_dir": scratch_dir,
        "slurm_or": lambda name: slurm_run_name() or name,  # a SLURM batch job's name, kept when requeued
        "or_else": lambda value, other: str(value) if value else other,
        "if_set": lambda value, then, other: then if value else other,
        "metric_mode": s.metric_direction,
        "tool_groups": tool_groups,
        "tool_summary": tool_summary,
    }
    for name, resolver in resolvers.items():
        OmegaConf.register_new_resolver(name, resolver, replace=True)


def register_configs() -> None:
    """Schemas into Hydra's ConfigStore, and the resolvers; safe to call more than once."""
    store = ConfigStore.instance()
    for group, options in OPTIONS.items():
        for option, schema in options.items():
            store.store(group=f"schema/{group}", name=option, node=schema)
    store.store(group="schema", name="train", node=s.TrainConfig)
    store.store(group="schema", name="pretrain", node=s.PretrainConfig)
    store.store(group="schema", name="eval", node=s.EvalConfig)
    store.store(group="schema", name="summary", node=s.SummaryConfig)
    store.store(group="schema", name="demo", node=s.DemoConfig)
    store.store(group="schema", name="predict", node=s.PredictConfig)
    store.store(group="schema", name="export", node=s.ExportConfig)
    store.store(group="schema", name="optimize", node=s.OptimizeConfig)
    store.store(group="schema", name="analyze", node=s.AnalyzeConfig)
    store.store(group="data", name=CHECKPOINT_DATA, node=_data_overrides())
    register_resolvers()


def compose_config(config_name: str, overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """conf/<config_name>.yaml with these overrides, outside a Hydra app (tests, benchmarks); with_hydra:
    with the `hydra` node, as Hydra's callbacks see it."""
    register_configs()
    if GlobalHydra.instance().is_initialized():  # within one of our apps, or kept initialized by the caller
        return compose(config_name, overrides=overrides, return_hydra_config=with_hydra)
    with initialize_config_module("transferlab.conf", version_base="1.3"):
        return compose(config_name, overrides=overrides, return_hydra_config=with_hydra)
