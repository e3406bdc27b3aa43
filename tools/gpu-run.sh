#!/usr/bin/env bash
# Runs on a GPU machine, from the folder tools/gpu-check.sh packs (carry/): kdx's CUDA selftest,
# kdx's bench, PyTorch's bench of the same entries (when python3 has torch with CUDA), and the two
# side by side. Full outputs go to $OUT (where the device tool collects them), else to
# ./gpu-results; the console gets the selftest's failures and summary, then the comparison.
#   bash carry/gpu-run.sh
# Each step has a time limit so that the whole run ends within the tool's 10 minutes per call.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-$PWD/gpu-results}"
mkdir -p "$out"
log="$out/log.txt"
export PYTHONUNBUFFERED=1

# The bench's FLOP/s ceiling is cuBLAS, loaded at run time: the toolkit's libcublas, else the one
# PyTorch's nvidia-* wheels carry.
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so\.13 '; then
  wheel_libs="$(python3 -c 'import nvidia, os; print(*(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in sorted(os.listdir(p))))' 2>/dev/null)"
  for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib $wheel_libs; do
    if [ -e "$dir/libcublas.so.13" ]; then
      export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      break
    fi
  done
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
} >"$log" 2>&1

echo "== kdx selftest --device cuda"
timeout -k 10 120 "$here/kdx" selftest --device cuda >"$out/selftest.txt" 2>&1
echo "exit status $?" >>"$out/selftest.txt"
grep -E 'FAIL|^candidate|^reference' "$out/selftest.txt" | head -n 60
tail -n 2 "$out/selftest.txt"

echo "== kdx bench --device cuda"
timeout -k 10 170 "$here/kdx" bench --device cuda --json --runs 30 --budget 2 \
  >"$out/kdx-bench.json" 2>>"$log"
echo "kdx bench exit status $?" >>"$log"

echo "== kdx bench --device cuda --gemm cublas matmul (the same products on cuBLAS)"
timeout -k 10 50 "$here/kdx" bench --device cuda --gemm cublas --runs 20 --budget 1 matmul \
  2>>"$log" | tee "$out/cublas-matmul.txt"

torch_runs=()
if python3 -c 'import torch, transformers; assert torch.cuda.is_available()' 2>>"$log"; then
  echo "== torch_bench.py --device cuda"
  timeout -k 10 110 python3 "$here/torch_bench.py" --device cuda --json --runs 30 --budget 2 \
    >"$out/torch-bench.json" 2>>"$log"
  echo "torch bench exit status $?" >>"$log"
  echo "== torch_bench.py --device cuda --compile (compiled training steps)"
  timeout -k 10 100 python3 "$here/torch_bench.py" --device cuda --json --compile \
    --filter compiled >"$out/torch-compiled.json" 2>>"$log"
  echo "torch compiled bench exit status $?" >>"$log"
  torch_runs=("$out/torch-bench.json" "$out/torch-compiled.json")
else
  echo "no python3 with torch and CUDA here: kdx's numbers only (see log.txt)"
fi

echo "== side by side"
python3 "$here/bench_compare.py" "$out/kdx-bench.json" "${torch_runs[@]}" | tee "$out/compare.txt"
