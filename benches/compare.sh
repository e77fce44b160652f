#!/usr/bin/env bash
# Runs segadapt's bench and the PyTorch reference on the same shapes in one go and prints ratios.
#   benches/compare.sh [WxH] [BATCH]      (needs python3 with torch and transformers)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-512x256}
batch=${2:-2}
cargo build --release -q
ours=$(./target/release/segadapt bench --config b0 --size "$size" --batch "$batch" --json)
ref=$(python3 benches/reference/segformer_torch.py --config b0 --size "$size" --batch "$batch" --json)
python3 - "$ours" "$ref" <<'PY'
import json, sys
o, r = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"B0 {o['size']} batch {o['batch']}, {o['threads']} threads, medians")
print(f"{'':22}{'segadapt':>12}{'pytorch':>12}{'speed-up':>10}")
for k, name in [("infer_ms", "inference ms"), ("train_step_ms", "train step ms"), ("ema_ms", "EMA update ms")]:
    print(f"{name:22}{o[k]:12.1f}{r[k]:12.1f}{r[k] / o[k]:9.2f}x")
print(f"{'infer peak MB':22}{o['infer_peak_rss_mb']:12.0f}{r['infer_peak_rss_mb']:12.0f}   (peak RSS)")
print(f"{'train peak MB':22}{o['train_peak_rss_mb']:12.0f}{r['train_peak_rss_mb']:12.0f}   (peak RSS)")
# What a step needs beyond the library: segadapt's heap peak (counting allocator, everything it
# allocated) against PyTorch's peak RSS above its RSS once torch was loaded.
torch_step = r['train_peak_rss_mb'] - r['base_rss_mb']
print(f"\nmemory a step needs beyond the library, MB (PyTorch: training step, {torch_step:.0f})")
for k, name in [("train_peak_mb", "training step"), ("adapt_peak_mb", "adaptation step, all weights"),
                ("adapt_norm_peak_mb", "adaptation step, norms train")]:
    print(f"{name:34}{o[k]:8.0f}   {o[k] / torch_step:5.2f}x PyTorch's")
PY
