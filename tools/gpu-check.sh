#!/usr/bin/env bash
# Builds the release binary with the CUDA kernels (KDX_REQUIRE_KERNELS=1: a kernel that does not
# compile stops here) and packs what a GPU machine needs into carry/ (git-ignored): the stripped
# binary, tools/gpu-run.sh, tools/torch_bench.py and tools/bench_compare.py. Then prints the one
# command to run there:
#   tools/gpu-check.sh
# On the GPU machine gpu-run.sh runs `kdx selftest --device cuda`, `kdx bench --device cuda --json`
# and, when python3 has torch with CUDA, `torch_bench.py --device cuda --json` (then its
# torch.compile'd entries), and prints kdx and PyTorch side by side; the full outputs go to $OUT.
# The carried folder stays well under the 64 MiB a device call may carry, and the run under its
# 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
KDX_REQUIRE_KERNELS=1 cargo build --release --bin kdx
rm -rf carry
mkdir carry
cp target/release/kdx carry/kdx
strip carry/kdx
cp tools/gpu-run.sh tools/torch_bench.py tools/bench_compare.py carry/
echo "carry/: $(du -sh carry | cut -f1) ($(ls carry | tr '\n' ' '))"
echo "Run on the GPU machine, carrying the folder carry (device tool: carry [\"carry\"], timeout_s 600):"
echo "  bash carry/gpu-run.sh"
