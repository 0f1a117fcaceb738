#!/usr/bin/env bash
# Distillation with few labels (issue 16): every class cut to 10 % of its training images (108 images;
# the cut follows data.split_seed, so it is the same for every run), digits at 64 px.
# Teacher: ResNet-18 from random weights, 15 epochs. Students: MobileNetV3-Small from random weights,
# 15 epochs, seeds 0-4, alone and distilled (distill.alpha=0.5, distill.temperature=4: the defaults).
# Two runs at a time, one thread each. Results: outputs/compression/kd10/*/metrics.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
OUT=outputs/compression/kd10
TENTH='{0:0.1,1:0.1,2:0.1,3:0.1,4:0.1,5:0.1,6:0.1,7:0.1,8:0.1,9:0.1}'
COMMON=(data=digits data.image_size=64 "data.class_fraction=$TENTH" trainer.max_epochs=15
        trainer.accelerator=cpu logger=none)
STUDENT=(backbone=torchvision backbone.name=mobilenet_v3_small backbone.weights=null)

train() {  # train <run name> <overrides...>: skipped when the run already has its metrics.json
  local run=$1; shift
  [ -f "$OUT/$run/metrics.json" ] || python train.py "$@" "${COMMON[@]}" hydra.run.dir="$OUT/$run"
}
TEACHER="$OUT/teacher_resnet18/checkpoints/best.ckpt"
train teacher_resnet18 backbone=resnet18 backbone.weights=null
for seed in 0 1 2 3 4; do
  train "student_plain_s$seed" "${STUDENT[@]}" seed=$seed &
  train "student_kd_s$seed" "${STUDENT[@]}" seed=$seed distill.teacher="$TEACHER"
  wait
done
python - <<'PY'
import json, statistics
from pathlib import Path

import torch
import torch_pruning as tp

from transferlab.compress.timing import LATENCY_BATCHES, timed_ms
from transferlab.inference.model import load_inference_model

out = Path("outputs/compression/kd10")
acc = lambda run: json.loads((out / run / "metrics.json").read_text())["test/acc"]


def size_and_speed(run: str) -> str:
    """params, MACs per 64 px image (torch-pruning's counter), eager fp32 latency at batch 1 and 32 (ms)."""
    model, _ = load_inference_model(out / run / "checkpoints" / "best.ckpt")
    model = model.float().eval()
    macs, params = tp.utils.count_ops_and_params(model, torch.randn(1, 3, 64, 64))
    cells = [f"{params / 1e6:.2f} M params", f"{macs / 1e6:.1f} M MACs"]
    with torch.inference_mode():
        for batch in LATENCY_BATCHES:
            times = timed_ms(model, torch.randn(batch, 3, 64, 64), runs=20)
            cells.append(f"batch {batch} {statistics.median(times):.2f} ms")
    return ", ".join(cells)


print(f"teacher_resnet18: test/acc {acc('teacher_resnet18'):.4f}; {size_and_speed('teacher_resnet18')}")
for kind in ("plain", "kd"):
    runs = [acc(f"student_{kind}_s{seed}") for seed in range(5)]
    print(f"student_{kind}: " + " ".join(f"{a:.4f}" for a in runs)
          + f"; mean {statistics.mean(runs):.4f} sd {statistics.stdev(runs):.4f}")
print(f"student (either): {size_and_speed('student_kd_s0')}")
PY
