"""The hand-written baseline of benchmarks/overhead.py: the work `train.py data=imagefolder ...` does,
in plain PyTorch, without Lightning, Hydra or torchmetrics.

    python benchmarks/plain_loop.py <image folder> <output dir> <marks.json> --epochs 3

The same split shares (val 0.2, test 0.1, stratified), transforms (random resized crop with scale
(0.5, 1) and a flip for training; resize and center crop for evaluation; ImageNet mean/std), model
(torchvision ResNet-18 from random weights, a new 10-class linear layer), optimizer (SGD lr 0.01,
Nesterov momentum 0.9, weight decay 1e-4) and schedule (a 1-epoch linear warmup, then cosine to 1%);
every epoch: train, validate (loss and accuracy), save best.ckpt (by val accuracy) and last.ckpt
(model and optimizer); then the best checkpoint is loaded and tested. Loader workers persist across
epochs, as train.py's do. Wall-clock marks go to marks.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time

START = time.time()  # before the imports: the process's own start-up counts

from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torchvision  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def transforms(size: int) -> tuple[v2.Compose, v2.Compose]:
    finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    train = v2.Compose(
        [
            v2.ToImage(),
            v2.RGB(),
            v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            *finish,
        ]
    )
    evaluate = v2.Compose(
        [
            v2.ToImage(),
            v2.RGB(),
            v2.Resize(round(size * 256 / 224), antialias=True),
            v2.CenterCrop(size),
            *finish,
        ]
    )
    return train, evaluate


def splits(root: Path, size: int) -> tuple[Subset, Subset, Subset]:
    train_t, eval_t = transforms(size)
    plain = torchvision.datasets.ImageFolder(str(root))
    indices = list(range(len(plain)))
    rest, test = train_test_split(indices, test_size=0.1, stratify=plain.targets, random_state=0)
    labels = [plain.targets[i] for i in rest]
    train, val = train_test_split(rest, test_size=0.2 / 0.9, stratify=labels, random_state=0)
    return (
        Subset(torchvision.datasets.ImageFolder(str(root), transform=train_t), train),
        Subset(torchvision.datasets.ImageFolder(str(root), transform=eval_t), val),
        Subset(torchvision.datasets.ImageFolder(str(root), transform=eval_t), test),
    )


def evaluate(model: torch.nn.Module, loader: DataLoader) -> tuple[float, float]:
    model.eval()
    loss, correct, seen = 0.0, 0, 0
    with torch.inference_mode():
        for images, targets in loader:
            logits = model(images)
            loss += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(1) == targets).sum())
            seen += len(targets)
    return loss / seen, correct / seen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("marks", type=Path)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(42)
    train, val, test = splits(args.data, args.size)
    loaders = {
        # persistent workers, as train.py's loaders: no new worker processes every epoch
        name: DataLoader(
            ds,
            batch_size=args.batch_size,
            shuffle=name == "train",
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
        )
        for name, ds in (("train", train), ("val", val), ("test", test))
    }
    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    steps = args.epochs * len(loaders["train"])
    warmup = len(loaders["train"])

    def factor(step: int) -> float:  # linear warmup over an epoch, then cosine to 1%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    args.out.mkdir(parents=True, exist_ok=True)
    epochs, best = [], -1.0
    for epoch in range(args.epochs):
        marks = {"train_start": time.time()}
        model.train()
        for images, targets in loaders["train"]:
            marks.setdefault("first_batch", time.time())  # the batch is in hand: the step starts
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(images), targets).backward()
            optimizer.step()
            schedule.step()
        marks["train_end"] = marks["val_start"] = time.time()
        val_loss, val_acc = evaluate(model, loaders["val"])
        marks["val_end"] = time.time()
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
        if val_acc > best:
            best = val_acc
            torch.save(state, args.out / "best.ckpt")
        torch.save(state, args.out / "last.ckpt")
        marks["ckpt_end"] = time.time()
        epochs.append(marks)
        print(f"epoch {epoch}: val/loss {val_loss:.4f} val/acc {val_acc:.4f}", flush=True)
    test_start = time.time()
    model.load_state_dict(torch.load(args.out / "best.ckpt", weights_only=True)["model"])
    test_loss, test_acc = evaluate(model, loaders["test"])
    print(f"test/loss {test_loss:.4f} test/acc {test_acc:.4f}")
    args.marks.write_text(
        json.dumps(
            {"epochs": epochs, "test_start": test_start, "test_end": time.time(), "imports_end": START}
        )
    )


if __name__ == "__main__":
    main()
