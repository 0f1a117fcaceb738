"""What channel pruning buys in eager PyTorch on the CPU, before any fine-tuning (compress.prune):

    OMP_NUM_THREADS=1 python benchmarks/prune_speed.py

ResNet-18 at 64 px and EfficientNet-Lite0 at 224 px, fp32, unpruned and with 30/50/70 % of every
backbone layer's channels removed (`prune_classifier`, L1 ranking; random weights: the widths, hence
the speed, do not depend on them). Per model: parameters, MACs per image (torch-pruning's counter),
and the median latency of a forward pass at batch 1 and 32 (`torch.inference_mode`, one thread by
default, after warm-up). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from transferlab.compress.prune import prune_classifier
from transferlab.models.classifier import ImageClassifier

MODELS = [("torchvision", "resnet18", 64), ("packaged", "efficientnet_lite0", 224)]
AMOUNTS = [0.0, 0.3, 0.5, 0.7]


def classifier(source: str, name: str, size: int) -> ImageClassifier:
    return ImageClassifier(
        backbone={"source": source, "name": name, "weights": None, "trust_file": False},
        head={"_target_": "transferlab.models.heads.LinearHead"},
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        optim={"_target_": "torch.optim.SGD", "lr": 0.01},
        scheduler={"name": "none"},
        freeze={"name": "full"},
        preprocessing={"crop_size": size, "resize_size": size, "mean": [0.5] * 3, "std": [0.5] * 3},
    ).eval()


def latency_ms(model: torch.nn.Module, batch: torch.Tensor, repeats: int) -> float:
    """Median wall time of one forward pass, after two warm-up passes."""
    times = []
    with torch.inference_mode():
        for _ in range(2):
            model(batch)
        for _ in range(repeats):
            started = time.perf_counter()
            model(batch)
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def measure(source: str, name: str, size: int, amount: float, repeats: dict[int, int]) -> dict:
    torch.manual_seed(0)
    model = classifier(source, name, size)
    example = torch.randn(1, 3, size, size)
    report = prune_classifier(model, example, amount) if amount else None
    if report is None:
        import torch_pruning as tp

        macs, params = tp.utils.count_ops_and_params(model, example)
    else:
        macs, params = report.macs_after, report.params_after
    row = {"model": name, "size": size, "amount": amount, "params": params, "macs": macs}
    for batch_size, count in repeats.items():
        row[f"b{batch_size}"] = latency_ms(model.eval(), torch.randn(batch_size, 3, size, size), count)
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| model | px | channels removed | params (M) | MACs/image (M) | batch 1 (ms) | speed-up | "
        "batch 32 (ms) | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base: dict[str, dict] = {}
    for row in rows:
        ref = base.setdefault(row["model"], row)
        lines.append(
            f"| {row['model']} | {row['size']} | {row['amount']:.0%} | {row['params'] / 1e6:.2f} | "
            f"{row['macs'] / 1e6:.0f} | {row['b1']:.2f} | {ref['b1'] / row['b1']:.2f}x | "
            f"{row['b32']:.1f} | {ref['b32'] / row['b32']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats-b1", type=int, default=50)
    parser.add_argument("--repeats-b32", type=int, default=9)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = {1: args.repeats_b1, 32: args.repeats_b32}
    rows = [measure(*spec, amount, repeats) for spec in MODELS for amount in AMOUNTS]
    text = f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), fp32, eager\n\n{table(rows)}"
    print(text)
    return text


if __name__ == "__main__":
    main()
