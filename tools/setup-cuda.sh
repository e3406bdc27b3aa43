#!/usr/bin/env bash
# Installs the CUDA compiler (nvcc + NVVM + ptxas + fatbinary), the CUDA headers and the runtime
# into .cuda/ (git-ignored) from NVIDIA's Python wheels: no system CUDA, no root, no GPU needed.
# build.rs finds nvcc there and compiles kernels/*.cu into the binary.
#   tools/setup-cuda.sh        (about 270 MB; a no-op when the same versions are installed)
#
# The versions match the GPU machines' CUDA 13.0 driver: a PTX or cubin from a newer toolkit may not
# load there. nvcc reads bin/nvcc.profile, which locates the headers (include/, include/cccl for
# <nv/target> and CUB), NVVM (cicc, libdevice) and ptxas relative to nvcc itself, so
# `.cuda/nvidia/cu13/bin/nvcc` works by absolute path with no PATH, -I or environment set up.
# The host compiler (g++) is the only thing taken from the system: nvcc runs its preprocessor.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.cuda"
nvcc="$dest/nvidia/cu13/bin/nvcc"
python="${PYTHON:-python3}"
packages=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
stamp_name=".kdx-packages"
wanted="$(printf '%s\n' "${packages[@]}")"

if [ -x "$nvcc" ] && [ "$(cat "$dest/$stamp_name" 2>/dev/null)" = "$wanted" ]; then
  echo "CUDA toolchain already installed: $nvcc"
  exit 0
fi

if ! "$python" -m pip --version >/dev/null 2>&1; then
  echo "error: '$python -m pip' does not run: install Python 3 with pip (or set PYTHON=/path/to/python3)" >&2
  exit 1
fi
if ! command -v "${NVCC_CCBIN:-g++}" >/dev/null 2>&1; then
  echo "error: nvcc needs a host C++ compiler and '${NVCC_CCBIN:-g++}' is not on PATH: install g++ (Debian/Ubuntu: apt-get install g++)" >&2
  exit 1
fi

# Leftovers of an install that was killed before it could clean up.
rm -rf "$root"/.cuda-*.tmp

# Everything goes into a temporary folder beside .cuda/ (same file system, ignored by git through
# *.tmp) and is renamed into place once it works, so an interrupted install leaves nothing half-done.
tmp="$(mktemp -d "$root/.cuda-XXXXXX.tmp")"
trap 'rm -rf "$tmp"' EXIT

echo "Installing ${packages[*]} into $dest"
start=$SECONDS
PIP_ROOT_USER_ACTION=ignore "$python" -m pip install --no-deps --only-binary=:all: \
  --disable-pip-version-check --no-warn-script-location --progress-bar off \
  --target "$tmp/root" "${packages[@]}"

new_nvcc="$tmp/root/nvidia/cu13/bin/nvcc"
if [ ! -x "$new_nvcc" ]; then
  echo "error: the wheels installed no nvidia/cu13/bin/nvcc: the packages' layout changed" >&2
  exit 1
fi

# Smoke test: a bf16 kernel (cuda_bf16.h needs cccl's <nv/target>, erff needs libdevice) compiled
# for every target build.rs uses, so a broken toolchain fails here rather than in cargo.
cat >"$tmp/smoke.cu" <<'EOF'
#include <cuda_bf16.h>
extern "C" __global__ void smoke(const __nv_bfloat16* x, float* y, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = erff(__bfloat162float(x[i]));
}
EOF
if ! "$new_nvcc" -std=c++17 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
  -gencode arch=compute_90,code=compute_90 --fatbin -o "$tmp/smoke.fatbin" "$tmp/smoke.cu"; then
  echo "error: the freshly installed nvcc cannot compile a test kernel (see above)" >&2
  exit 1
fi

printf '%s\n' "$wanted" >"$tmp/root/$stamp_name"
if [ -e "$dest" ]; then
  mv "$dest" "$tmp/old"
fi
mv "$tmp/root" "$dest"

# build.rs watches the nvcc it found; when it found none, nothing it watches changed, so make cargo
# run it again (the file's content is untouched).
touch "$root/build.rs"

"$nvcc" --version | grep release
echo "Installed in $((SECONDS - start)) s. nvcc: $nvcc"
