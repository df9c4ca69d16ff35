#!/usr/bin/env bash
# Prepares a CUDA 13.0 + NCCL build of helix on a machine with no GPU and no CUDA toolkit (how
# ../shared/README.md says it is done here): NVIDIA's toolkit pieces from PyPI in a venv, the
# unversioned library names the linker wants, and a stub libcuda.so (the driver, which only the
# GPU machine has; the binary loads the real one at run time). Prints the environment to build
# with; use it as:
#   eval "$(scripts/setup-cuda-build.sh)"
#   cargo build --release -p helix-train --features cuda,nccl
set -euo pipefail
cd "$(dirname "$0")/.."
root="${HELIX_CUDA_ENV:-$HOME/.cache/helix/cuda}"
stamp="$root/.complete-v1"
if [ ! -f "$stamp" ]; then
  python3 -m venv "$root/venv" >&2
  "$root/venv/bin/pip" install -q --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.0.0.19 nvidia-curand nvidia-nccl-cu13 >&2
  site=$("$root/venv/bin/python" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))')
  cu="$site/nvidia/cu13"
  nccl="$site/nvidia/nccl"
  mkdir -p "$root/lib"
  # The linker wants libX.so; the wheels ship libX.so.N.
  for lib in cublas cublasLt curand nvrtc cudart; do
    f=$(ls "$cu"/lib/lib$lib.so.* 2>/dev/null | head -n 1)
    [ -n "$f" ] && ln -sf "$f" "$root/lib/lib$lib.so"
  done
  f=$(ls "$nccl"/lib/libnccl.so.* | head -n 1)
  ln -sf "$f" "$root/lib/libnccl.so"
  # A stub driver: every cu* function cudarc's bindings name, doing nothing. Only the linker
  # sees it.
  cargo fetch -q >&2
  sys=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19.10/src/driver/sys | head -n 1)
  grep -rhoE '\bcu[A-Z][A-Za-z0-9_]*\b' "$sys" | sort -u |
    awk '{ printf "void %s(void) {}\n", $1 }' > "$root/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/libcuda.so" "$root/cuda_stub.c"
  ln -sf libcuda.so "$root/lib/libcuda.so.1"
  echo "$cu" > "$root/cu_dir"
  echo "$nccl" > "$root/nccl_dir"
  touch "$stamp"
fi
cu=$(cat "$root/cu_dir")
nccl=$(cat "$root/nccl_dir")
echo "export PATH=\"$cu/bin:\$PATH\""
echo "export CUDA_ROOT=\"$cu\" CUDA_PATH=\"$cu\" CUDA_COMPUTE_CAP=90"
echo "export LIBRARY_PATH=\"$root/lib:$cu/lib:$nccl/lib\""
echo "export HELIX_NCCL_LIB=\"$nccl/lib\" HELIX_CUDA_LIB=\"$cu/lib\""
