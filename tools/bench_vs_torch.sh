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

python3 - "$out/kdx.json" "$out/torch.json" <<'PY'
import json, sys
kdx = json.load(open(sys.argv[1]))
torch = json.load(open(sys.argv[2]))
# kdx op names carry a dtype suffix (/f32); PyTorch's run in f32 without one.
theirs = {e["name"]: e for e in torch["entries"]}
print(f"kdx: {kdx['device']}    PyTorch: {torch.get('framework', '?')}, {torch.get('threads', '?')} threads")
print(f"{'entry':<42} {'kdx ms':>10} {'torch ms':>10} {'speed-up':>9}")
for e in kdx["entries"]:
    t = theirs.get(e["name"]) or theirs.get(e["name"].removesuffix("/f32"))
    if t is None:
        print(f"{e['name']:<42} {e['median_ms']:>10.3f} {'-':>10} {'-':>9}")
    else:
        print(f"{e['name']:<42} {e['median_ms']:>10.3f} {t['median_ms']:>10.3f} {t['median_ms'] / e['median_ms']:>8.2f}x")
PY
