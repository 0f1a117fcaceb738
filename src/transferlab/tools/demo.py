"""`make demo`: transfer learning offline on scikit-learn's digits, in a few minutes on a CPU.

Target task: digits 5-9 with 2 labelled images per class (experiment=digits_fewshot). Default methods:
1. EfficientNet-Lite0 from its ImageNet weights (the packaged ones), fine-tuned with train.yaml's defaults;
2. the same network as a linear probe (frozen backbone, features cached);
3. the same network from random weights;
4. ResNet-18 pretrained from scratch on digits 0-4 ("a related task"; one source run), fine-tuned with
   the defaults but one LR for every layer (its best recipe in experiments/imagenet_transfer).
Each run is a plain `transferlab train experiment=...` run (in this process); the table goes to stdout and
results.md. `methods=` also takes the ResNet-18 recipes of experiments/finetune_strategies.

    transferlab demo [seeds=[1,2,3]] [shots=2] [methods=[imagenet_finetune,imagenet_scratch]] [out=DIR] ['overrides=["trainer.max_epochs=5"]']
"""

from __future__ import annotations

import json
import logging
import shlex
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from transferlab.config.parse import build
from transferlab.config.schema import DemoConfig
from transferlab.errors import ConfigError
from transferlab.launch import claim_directory
from transferlab.tools.app import hydra_tool, run_in_process, run_program

WEIGHTS = "backbone.weights={pretrained}"  # the source run's checkpoint (digits 0-4)
LINEAR_PROBE = ["freeze=linear_probe", "augment=none", "optim.lr=0.1"]  # no augmentation: features cached
# slug -> (label, experiment, overrides); every method trains on the same labelled images of the seed
TARGET_METHODS = {
    "imagenet_finetune": (
        "EfficientNet-Lite0, ImageNet weights, fine-tuned (defaults)",
        "digits_fewshot",
        [],
    ),
    "imagenet_linear_probe": (
        "EfficientNet-Lite0, ImageNet weights, linear probe",
        "digits_fewshot",
        LINEAR_PROBE,
    ),
    "imagenet_scratch": ("EfficientNet-Lite0 from scratch", "digits_fewshot", ["backbone.weights=null"]),
    "digits_pretrained": (
        "ResNet-18 pretrained on digits 0-4, fine-tuned (defaults)",
        "digits_fewshot",
        ["backbone=resnet18", WEIGHTS],
    ),
    # ResNet-18 from digits 0-4 with the recipes of experiments/finetune_strategies (digits_finetune)
    "scratch": ("ResNet-18 from scratch (random init)", "digits_scratch", []),
    "linear_probe": (
        "ResNet-18 linear probe",
        "digits_finetune",
        [WEIGHTS, "freeze=linear_probe", "optim.lr=0.05"],
    ),
    "partial": (
        "ResNet-18 partial: last 2 stages",
        "digits_finetune",
        [WEIGHTS, "freeze=partial", "freeze.trainable_blocks=2"],
    ),
    "gradual": (
        "ResNet-18 gradual: head, layer4 at 10, all at 20",
        "digits_finetune",
        [WEIGHTS, "freeze=gradual", "freeze.milestones=[10,20]", "freeze.bn=eval"],
    ),
    "lp_ft": (
        "ResNet-18 LP-FT: head, then all at 10",
        "digits_finetune",
        [WEIGHTS, "freeze=gradual", "freeze.milestones=[10]", "freeze.bn=eval"],
    ),
    "full": ("ResNet-18 full fine-tune", "digits_finetune", [WEIGHTS]),
    "full_discriminative": (
        "ResNet-18 full, backbone LR x0.1",
        "digits_finetune",
        [WEIGHTS, "optim.backbone_lr_mult=0.1"],
    ),
    "full_layer_decay": (
        "ResNet-18 full, layer decay 0.75",
        "digits_finetune",
        [WEIGHTS, "optim.layer_decay=0.75"],
    ),
}
METRICS = ("test/acc", "test/f1", "val/acc")


def run_train(run_dir: Path, experiment: str, overrides: list[str]) -> dict:
    """One `transferlab train` run in `run_dir`, in this process (a process start-up per run would cost
    seconds each); its log goes only to <run_dir>/train.log, the console keeps the demo's progress."""
    args = [
        f"experiment={experiment}",
        f"hydra.run.dir={run_dir}",
        *overrides,
        "callbacks.progress.mode=plain",
    ]
    print(f"$ transferlab train {' '.join(args)}", flush=True)
    start = time.monotonic()
    log_file = run_dir / "train.log"
    # what the run prints (Lightning's model summary, warnings) joins its log afterwards: the run
    # directory must be new when the run claims it
    with tempfile.TemporaryFile("w+") as output:
        with redirect_stdout(output), redirect_stderr(output):
            status = run_in_process("train", [*args, "hydra/job_logging=file_only"])
        output.seek(0)
        printed = output.read()
    if log_file.is_file():
        with open(log_file, "a") as log:
            log.write("--- printed by the run ---\n" + printed)
    if status != 0:
        text = log_file.read_text() if log_file.is_file() else printed
        tail = "".join(text.splitlines(keepends=True)[-25:])
        raise SystemExit(f"demo step failed (exit {status}); last lines of {log_file}:\n{tail}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(f"  done in {time.monotonic() - start:.0f}s: test/acc={metrics['test/acc']:.3f}", flush=True)
    return metrics


def summarise(results: dict[str, list[dict]]) -> str:
    """A Markdown table: mean (and spread over seeds) of each metric per method, and the test
    accuracy of each seed (the seeds pick the few labelled images, so compare methods seed by seed)."""
    seeds = len(next(iter(results.values())))
    columns = [*METRICS, "test/acc per seed"]
    header = "| method | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    rows = []
    for method, runs in results.items():
        cells = []
        for key in METRICS:
            values = [run[key] for run in runs]
            spread = f" ± {statistics.stdev(values):.3f}" if seeds > 1 else ""
            cells.append(f"{statistics.mean(values):.3f}{spread}")
        cells.append(" ".join(f"{run['test/acc']:.3f}" for run in runs))
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    note = f"\nMean over {seeds} seeds ± standard deviation.\n" if seeds > 1 else "\n"
    return header + "\n".join(rows) + "\n" + note


def run(cfg: DictConfig) -> None:
    config = build(DemoConfig, OmegaConf.to_container(cfg, resolve=True), "", "demo.yaml")
    out = Path(config.out) if config.out else Path("outputs") / "demo" / time.strftime("%Y-%m-%d_%H-%M-%S")
    try:  # a new or empty folder only: the demo's runs and results.md never land among other files
        claim_directory(out, marker="results.md")
    except ConfigError as error:
        raise SystemExit(f"Error: out: {error}") from None
    logging.captureWarnings(True)  # library warnings of the runs go to their logs, not the console
    try:
        run_demo(config, out)
    finally:
        logging.captureWarnings(False)


def run_demo(config: DemoConfig, out: Path) -> None:
    """The source run if a method needs it, then each method and seed; the table to stdout and <out>/results.md."""
    started = time.monotonic()
    print(f"Demo directory: {out}", flush=True)
    needs_source = any(WEIGHTS in TARGET_METHODS[slug][2] for slug in config.methods)
    source, pretrained = None, None
    if needs_source:
        print("[source] ResNet-18 from scratch on digits 0-4 (the related task)", flush=True)
        source = run_train(out / "pretrain", "digits_pretrain", config.overrides)
        pretrained = source["best_ckpt"]
    print("[target] digits 5-9, few labels per class", flush=True)
    results: dict[str, list[dict]] = {}
    for slug in config.methods:
        label, experiment, overrides = TARGET_METHODS[slug]
        for seed in config.seeds:
            filled = [o.format(pretrained=pretrained) for o in overrides]
            if config.shots is not None:
                filled.append(f"data.shots={config.shots}")
            run = run_train(
                out / f"{slug}_seed{seed}", experiment, [*filled, f"seed={seed}", *config.overrides]
            )
            results.setdefault(f"{label} (`{slug}`)", []).append(run)
    table = summarise(results)
    command = "transferlab demo " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])  # as typed in a shell
    source_line = (
        f"Related task: ResNet-18 from scratch on digits 0-4 (test/acc {source['test/acc']:.3f}). "
        if source is not None
        else ""
    )
    report = (
        f"# Transfer demo\n\n{source_line}Target: digits 5-9, {_shots(out)} labelled images per class; "
        f"val/test are the full held-out splits.\n\n"
        f"{table}\nCommand: `{command.strip()}` ({time.monotonic() - started:.0f}s)\n"
    )
    (out / "results.md").write_text(report)
    print("\n" + report + f"\nWritten to {out / 'results.md'}")


def _shots(out: Path) -> str:
    """Labelled images per class of the target runs, from their saved configs."""
    for saved in sorted(out.glob("*_seed*/.hydra/config.yaml")):
        shots = OmegaConf.load(saved).data.shots
        return "all" if shots is None else str(shots)
    return "all"


main = hydra_tool("demo")(run)

if __name__ == "__main__":
    run_program(main)
