#!/usr/bin/env bash
# Builds and links segadapt with `--features cuda` on an x86-64 host without a GPU or a CUDA
# install, from PyPI's CUDA 13.0 wheels (see the README's "Install and build"):
#   benches/cuda-build.sh [clippy]     (needs python3 with venv; CUDA_COMPUTE_CAP defaults to 87)
# `clippy` only compiles and lints (what CI runs); without it the binary is linked too, against
# the wheels' cuBLAS/cuRAND/NVRTC/cudart and a stub libcuda (the driver's library, loaded from
# the real driver at run time), into target/cuda/release/segadapt.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-build}
cap=${CUDA_COMPUTE_CAP:-87}
venv=target/cuda-venv
extras="nvcc,cudart,cccl"
[ "$mode" = clippy ] || extras="$extras,cublas,curand,nvrtc"
if [ ! -x "$venv/bin/pip" ]; then
    if ! python3 -m venv "$venv" 2>/dev/null; then
        # Debian's python3 keeps venv in a package of its own.
        rm -rf "$venv"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq python3 python3-venv >/dev/null
        python3 -m venv "$venv"
    fi
fi
"$venv/bin/pip" install -q "cuda-toolkit[$extras]==13.0.*"
toolkit=$(echo "$PWD/$venv"/lib/python3*/site-packages/nvidia/cu13)
# cudarc refuses toolkits newer than it knows; 13.0 also matches driver 580's PTX.
export PATH="$toolkit/bin:$PATH" CUDA_ROOT="$toolkit" CUDA_PATH="$toolkit"
export CUDA_COMPUTE_CAP="$cap" CUDARC_CUDA_VERSION=13000 CARGO_TARGET_DIR=target/cuda
if [ "$mode" = clippy ]; then
    cargo clippy --release --all-targets --features cuda -- -D warnings
    exit 0
fi
# The wheels ship versioned libraries only (libcublas.so.13): the linker wants libcublas.so.
link="$CARGO_TARGET_DIR/link"
mkdir -p "$link"
for f in "$toolkit"/lib/lib*.so.*; do
    base=$(basename "$f")
    ln -sf "$f" "$link/${base%%.so.*}.so"
done
# A stub libcuda with every driver symbol cudarc calls, soname libcuda.so.1.
cargo build --release --features cuda --lib
rlib=$(ls "$CARGO_TARGET_DIR"/release/deps/libcudarc-*.rlib | head -n 1)
nm "$rlib" 2>/dev/null | awk '$1 == "U" && $2 ~ /^cu/ { print "void " $2 "(void) {}" }' \
    | sort -u > "$link/stub.c"
gcc -shared -fPIC -o "$link/libcuda.so" -Wl,-soname,libcuda.so.1 "$link/stub.c"
LIBRARY_PATH="$link:${LIBRARY_PATH:-}" cargo build --release --features cuda
echo "linked: $CARGO_TARGET_DIR/release/segadapt (needs libcuda.so.1 and libcudart.so.13 at run time)"
