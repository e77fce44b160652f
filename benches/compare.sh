#!/usr/bin/env bash
# Runs segadapt's bench and the PyTorch reference on the same shapes, alternating, and prints
# ratios. On a shared machine the speed drifts within minutes, so each side runs ROUNDS times
# (default 3) in turn: the table holds the median over rounds of each side's medians, and the
# range of the per-round ratios.
#   benches/compare.sh [WxH] [BATCH]      (needs python3 with torch and transformers)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-512x256}
batch=${2:-2}
rounds=${ROUNDS:-3}
cargo build --release -q
ours=()
refs=()
for _ in $(seq "$rounds"); do
    ours+=("$(./target/release/segadapt bench --config b0 --size "$size" --batch "$batch" --json)")
    refs+=("$(python3 benches/reference/segformer_torch.py --config b0 --size "$size" --batch "$batch" --json)")
done
# Memory does not drift: the deployed profile's component set is measured once.
prof="$(./target/release/segadapt bench --config b0 --size "$size" --batch "$batch" --reps 2 --warmup 1 \
    --profile firmware-configs/x86-64-cpu.toml --json)"
python3 - "$rounds" "${ours[@]}" "${refs[@]}" "$prof" <<'PY'
import json, statistics, sys
n = int(sys.argv[1])
os_ = [json.loads(a) for a in sys.argv[2:2 + n]]
rs = [json.loads(a) for a in sys.argv[2 + n:2 + 2 * n]]
prof = json.loads(sys.argv[2 + 2 * n])
med = lambda runs, k: statistics.median(r[k] for r in runs)
o0 = os_[0]
print(f"B0 {o0['size']} batch {o0['batch']}, {o0['threads']} threads, {n} alternating rounds")
print(f"{'':22}{'segadapt':>12}{'pytorch':>12}{'speed-up':>10}   per-round")
for k, name in [("infer_ms", "inference ms"), ("train_step_ms", "train step ms"), ("ema_ms", "EMA update ms")]:
    o, r = med(os_, k), med(rs, k)
    per = sorted(b[k] / a[k] for a, b in zip(os_, rs))
    print(f"{name:22}{o:12.1f}{r:12.1f}{r / o:9.2f}x   {per[0]:.2f}-{per[-1]:.2f}x")
print(f"{'infer peak MB':22}{med(os_, 'infer_peak_rss_mb'):12.0f}{med(rs, 'infer_peak_rss_mb'):12.0f}   (peak RSS)")
print(f"{'train peak MB':22}{med(os_, 'train_peak_rss_mb'):12.0f}{med(rs, 'train_peak_rss_mb'):12.0f}   (peak RSS)")
# What a step needs beyond the library: segadapt's heap peak (counting allocator, everything it
# allocated) against PyTorch's peak RSS above its RSS once torch was loaded.
torch_step = med(rs, 'train_peak_rss_mb') - med(rs, 'base_rss_mb')
print(f"\nmemory a step needs beyond the library, MB (PyTorch: training step, {torch_step:.0f})")
for k, name in [("train_peak_mb", "training step"), ("adapt_peak_mb", "adaptation step, all weights"),
                ("adapt_norm_peak_mb", "adaptation step, norms train"),
                ("adapt_recompute_peak_mb", "adaptation step, blocks recomputed")]:
    print(f"{name:34}{med(os_, k):8.0f}   {med(os_, k) / torch_step:5.2f}x PyTorch's")
print("x86-64-cpu profile's components:")
for k, name in [("adapt_peak_mb", "  adaptation step, all weights"),
                ("adapt_recompute_peak_mb", "  adaptation step, blocks recomputed")]:
    print(f"{name:34}{prof[k]:8.0f}   {prof[k] / torch_step:5.2f}x PyTorch's")
a, r = med(os_, "adapt_step_ms"), med(os_, "adapt_step_recompute_ms")
print(f"\nadaptation step ms (every component): {a:.1f} kept, {r:.1f} blocks recomputed ({r / a:.2f}x)")
PY
