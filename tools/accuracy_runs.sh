#!/usr/bin/env bash
# The accuracy study of the training-loop issue, on uci-sentiment with MiniLM-L6 (CPU):
# a teacher fine-tuned with kdx finetune's defaults, then a 2-layer student (embeddings + bottom 2
# layers) fine-tuned alone and distilled with vanilla KD, over 3 seeds each (lr 1e-4, 3 epochs,
# batch 32, as the PyTorch reference). Prints every run's test accuracy and mean ± std.
#   tools/accuracy_runs.sh [RUNS_DIR]     (default runs/accuracy; takes about 15 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/accuracy}"
kdx="${KDX:-target/release/kdx}"
mkdir -p "$out"
"$kdx" fetch minilm-l6 >/dev/null
[ -f "$out/teacher/report.json" ] || "$kdx" finetune --model weights/minilm-l6 --task uci-sentiment --out "$out/teacher"
for seed in 1 2 3; do
  [ -f "$out/ft-l2-s$seed/report.json" ] || "$kdx" finetune --model weights/minilm-l6 --layers 2 \
    --task uci-sentiment --lr 1e-4 --seed "$seed" --out "$out/ft-l2-s$seed"
  [ -f "$out/kd-l2-s$seed/report.json" ] || "$kdx" distill --method kd --teacher "$out/teacher" \
    --student weights/minilm-l6 --student-layers 2 --task uci-sentiment --lr 1e-4 --seed "$seed" --out "$out/kd-l2-s$seed"
done
python3 - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
acc = lambda run: json.loads((out / run / "report.json").read_text())["test"]["accuracy"] * 100
print(f"teacher (MiniLM-L6, 6 layers): test accuracy {acc('teacher'):.2f}%")
for kind, label in [("ft", "2-layer student, fine-tuned"), ("kd", "2-layer student, vanilla KD")]:
    runs = [acc(f"{kind}-l2-s{s}") for s in (1, 2, 3)]
    print(f"{label}: {statistics.mean(runs):.2f} ± {statistics.stdev(runs):.2f}%  (seeds 1-3: {', '.join(f'{r:.2f}' for r in runs)})")
PY
