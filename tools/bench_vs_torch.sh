#!/usr/bin/env bash
# kdx and PyTorch on the same shapes, one after the other, printed side by side.
#   tools/bench_vs_torch.sh [FILTER]
# TORCH_PYTHON: a Python with torch + transformers (default python3); KDX: the kdx binary
# (default target/release/kdx). Both use every core (`--threads` = nproc for PyTorch).
set -euo pipefail
cd "$(dirname "$0")/.."
filter="${1:-}"
kdx="${KDX:-target/release/kdx}"
py="${TORCH_PYTHON:-python3}"
threads="$(nproc)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

"$kdx" bench --json ${filter:+"$filter"} > "$out/kdx.json"
"$py" tools/torch_bench.py --threads "$threads" --json ${filter:+--filter "$filter"} > "$out/torch.json"

python3 tools/bench_compare.py "$out/kdx.json" "$out/torch.json"
