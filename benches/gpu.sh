#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU and driver but no Rust toolchain. Build the
# binary on a host first (CUDA_COMPUTE_CAP=90 for H100/H200, 87 for Orin; 13.0 wheels for driver
# 580): `CUDA_COMPUTE_CAP=90 benches/cuda-build.sh` writes target/cuda/release/segadapt. Then, on
# the GPU machine, from the repository root:
#   benches/gpu.sh [BINARY] [OUT]        (defaults: target/cuda/release/segadapt, runs/gpu)
# It points the loader at the CUDA libraries its Python environment ships (cuBLAS, cuRAND,
# NVRTC, cudart from the nvidia-* wheels), then runs `segadapt bench` on cuda:0 (inference,
# training and adaptation step times at 512x256 batch 2) and a short `adapt` on the committed
# dusk clip with a cuda:0 profile, and prints steps/s, inference ms and device memory
# (nvidia-smi, sampled every 200 ms through both).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/cuda/release/segadapt}
out=${2:-runs/gpu}
mkdir -p "$out"
[ -x "$bin" ] || { echo "gpu.sh: $bin not found (build it with benches/cuda-build.sh)" >&2; exit 2; }
libs=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for root in site.getsitepackages() + [site.getusersitepackages()]:
    for lib in glob.glob(os.path.join(root, "nvidia", "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(lib))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$out/memory.csv" &
smi=$!
trap 'kill $smi 2>/dev/null || true' EXIT
used_mb() { tail -n 1 "$out/memory.csv"; }
echo "device memory before: $(used_mb) MB"

"$bin" --quiet bench --device cuda:0 --size 512x256 --batch 2 --json > "$out/bench.json"
"$bin" --quiet bench --device cuda:0 --size 512x256 --batch 2 --profile firmware-configs/x86-64-cpu.toml \
    --json > "$out/bench-profile.json"

# The x86 profile's adaptation on cuda:0 (same model, input and components as the demo).
sed -e 's/^device = "cpu"/device = "cuda:0"/' -e 's/^compute_capability = 0/compute_capability = 90/' \
    -e 's/^name = "x86-64-cpu"/name = "gpu-check"/' firmware-configs/x86-64-cpu.toml > "$out/profile.toml"
start=$(date +%s.%N)
"$bin" --quiet adapt --model models/camvid-day --profile "$out/profile.toml" \
    --source folder:assets/dusk-clip --steps-per-frame 1 --out "$out/adapt" --json \
    > "$out/adapt.json" 2> "$out/adapt.log"
end=$(date +%s.%N)
kill $smi 2>/dev/null || true

python3 - "$out" "$start" "$end" <<'PY'
import json, sys
out, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
b = json.load(open(f"{out}/bench.json"))
p = json.load(open(f"{out}/bench-profile.json"))
a = json.load(open(f"{out}/adapt.json"))
mem = [int(x) for x in open(f"{out}/memory.csv").read().split() if x.isdigit()]
print(f"B0 {b['size']} batch {b['batch']} on cuda:0")
print(f"  inference (batch 1)        {b['infer_ms']:8.1f} ms   ({1000 / b['infer_ms']:.0f} frames/s)")
print(f"  training step              {b['train_step_ms']:8.1f} ms   ({1000 / b['train_step_ms']:.1f} steps/s)")
print(f"  adaptation step, profile   {p['adapt_step_ms']:8.1f} ms   ({1000 / p['adapt_step_ms']:.1f} steps/s)")
print(f"  adaptation step, every component {b['adapt_step_ms']:.1f} ms")
s = a.get("summary", {})
print(f"adapt on the dusk clip: {s.get('frames_served')} served, {s.get('train_steps')} steps, "
      f"{s.get('train_steps_per_s', 0):.2f} steps/s, wall {end - start:.1f} s")
if mem:
    print(f"device memory used: {min(mem)} MB idle, {max(mem)} MB at the peak (nvidia-smi, 200 ms)")
PY
