"""The imbalance table from a sweep's run directories: `python experiments/imbalance/summarize.py DIR`.

DIR holds one directory per run (Hydra's multirun layout), each with `.hydra/config.yaml` and
`metrics.json`. Prints a Markdown table per `data.imbalance` option: test macro F1 (mean ± std over
seeds, then each seed's value), and the mean test recall of the cut (minority) classes and of the others.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

OPTIONS = ("none", "class_weights", "sampler", "focal")


def read_run(run_dir: Path) -> dict:
    """One run's imbalance option, seed, test F1 and mean recall of its cut and uncut classes."""
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cut = {str(c) for c in (cfg.data.class_fraction or {})}
    recall = {name: metrics[f"test/acc_class/{name}"] for name in metrics["class_names"]}
    return {
        "imbalance": cfg.data.imbalance,
        "seed": cfg.seed,
        "f1": metrics["test/f1"],
        "acc": metrics["test/acc"],
        "minority": statistics.mean(r for name, r in recall.items() if name in cut),
        "majority": statistics.mean(r for name, r in recall.items() if name not in cut),
    }


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def table(runs: list[dict]) -> str:
    by_option = defaultdict(list)
    for run in sorted(runs, key=lambda r: r["seed"]):
        by_option[run["imbalance"]].append(run)
    lines = [
        "| data.imbalance | test macro F1 (mean ± std) | per seed | minority recall | majority recall | test acc |",
        "|---|---|---|---|---|---|",
    ]
    for option in sorted(by_option, key=lambda o: OPTIONS.index(o) if o in OPTIONS else len(OPTIONS)):
        group = by_option[option]
        seeds = ", ".join(f"{r['f1']:.3f} ({r['seed']})" for r in group)
        stats = {key: _mean_std([r[key] for r in group]) for key in ("f1", "minority", "majority", "acc")}
        columns = [stats["f1"], seeds, stats["minority"], stats["majority"], stats["acc"]]
        lines.append(f"| `{option}` | " + " | ".join(columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args()
    runs = [read_run(d) for d in sorted(args.sweep_dir.iterdir()) if (d / "metrics.json").is_file()]
    print(table(runs))


if __name__ == "__main__":
    main()
