"""`make demo`: the whole transfer-learning loop offline on scikit-learn's digits, in a few minutes on a CPU.

1. pretrain ResNet-18 from scratch on digits 0-4 (the source task);
2. fine-tune that backbone on digits 5-9 with a few labels per class (the target task);
3. compare with a linear probe of the same backbone and with the same network trained from scratch.
Each step is a plain `transferlab train experiment=...` run (in this process); the table goes to stdout and results.md.

    transferlab demo [seeds=[1,2,3]] [shots=2] [methods=[full,scratch]] [out=DIR] ['overrides=["trainer.max_epochs=5"]']
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
from transferlab.tools.app import hydra_tool, run_in_process

WEIGHTS = "backbone.weights={pretrained}"  # the step-1 checkpoint
# slug -> (label, experiment, overrides); every method trains the recipe's epochs on the same labelled images
TARGET_METHODS = {
    "scratch": ("from scratch (random init)", "digits_scratch", []),
    "linear_probe": ("linear probe", "digits_finetune", [WEIGHTS, "freeze=linear_probe", "optim.lr=0.05"]),
    "partial": (
        "partial: last 2 stages",
        "digits_finetune",
        [WEIGHTS, "freeze=partial", "freeze.trainable_blocks=2"],
    ),
    "gradual": (
        "gradual: head, layer4 at 10, all at 20",
        "digits_finetune",
        [WEIGHTS, "freeze=gradual", "freeze.milestones=[10,20]", "freeze.bn=eval"],
    ),
    "lp_ft": (
        "LP-FT: head, then all at 10",
        "digits_finetune",
        [WEIGHTS, "freeze=gradual", "freeze.milestones=[10]", "freeze.bn=eval"],
    ),
    "full": ("full fine-tune", "digits_finetune", [WEIGHTS]),
    "full_discriminative": (
        "full, backbone LR x0.1",
        "digits_finetune",
        [WEIGHTS, "optim.backbone_lr_mult=0.1"],
    ),
    "full_layer_decay": (
        "full, layer decay 0.75",
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
    """Pretrain, then each method and seed; the table to stdout and <out>/results.md."""
    started = time.monotonic()
    print(f"Demo directory: {out}\n[1/2] pretraining ResNet-18 on digits 0-4 (source task)", flush=True)
    source = run_train(out / "pretrain", "digits_pretrain", config.overrides)
    pretrained = source["best_ckpt"]
    print("[2/2] digits 5-9 with few labels per class (target task)", flush=True)
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
    report = (
        f"# Digits transfer demo\n\nSource: digits 0-4 (pretraining test/acc {source['test/acc']:.3f}). "
        f"Target: digits 5-9, {_shots(out)} labelled images per class; val/test are the full held-out splits.\n\n"
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
    main()
