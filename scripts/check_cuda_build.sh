#!/usr/bin/env bash
# Prove that `cargo build --release --features cuda` compiles and links on a machine without a GPU
# or a CUDA install: nvcc and the CUDA 13.0 libraries come from PyPI wheels, libcuda (which only a
# driver provides) is replaced at link time by a stub generated from the symbols cudarc declares.
# The stub is never shipped: on a GPU machine the driver's libcuda.so.1 is loaded instead.
#
#   scripts/check_cuda_build.sh [VENV_DIR]     (default: .venv-cuda; ~1.2 GB of wheels)
# Output: target/cuda/lcm (stripped), and `ldd` of it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-cuda}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# Pinned to CUDA 13.0, the version of the lent GPU machines' driver (580).
"$VENV/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
CU13=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')

# A CUDA_ROOT with the layout cudarc's build script expects: bin/, include/, lib64/ (unversioned
# names) and lib64/stubs/libcuda.so.
ROOT=target/cuda-root
rm -rf "$ROOT" && mkdir -p "$ROOT/lib64/stubs"
ln -s "$(realpath "$CU13/bin")" "$ROOT/bin"
ln -s "$(realpath "$CU13/include")" "$ROOT/include"
for lib in "$CU13"/lib/*.so.*; do
    base=$(basename "$lib")
    ln -sf "$(realpath "$lib")" "$ROOT/lib64/$base"
    ln -sf "$(realpath "$lib")" "$ROOT/lib64/${base%%.so.*}.so"
done

# The driver stub: every cu* function cudarc links against, as an empty C function.
SYS=$(ls ~/.cargo/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | head -1)
awk '/extern "C" \{/{getline; print}' "$SYS" | grep -oE 'fn cu[A-Za-z0-9_]+' | sort -u |
    sed 's/^fn \(.*\)/int \1(void) { return 999; }/' > "$ROOT/stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$ROOT/lib64/stubs/libcuda.so.1" "$ROOT/stub.c"
ln -sf libcuda.so.1 "$ROOT/lib64/stubs/libcuda.so"

export PATH="$(realpath "$ROOT/bin"):$PATH" CUDA_ROOT="$(realpath "$ROOT")" CUDA_COMPUTE_CAP=90
CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda
# Stripped, the binary fits the device tool's 64 MiB carry limit (66.5 MB measured).
strip -o target/cuda/lcm target/cuda/release/lcm
ls -la target/cuda/lcm
ldd target/cuda/lcm | grep -E 'cuda|cublas|curand|nvrtc' || true
