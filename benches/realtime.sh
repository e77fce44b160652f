#!/usr/bin/env bash
# Serving at the camera's rate while adapting: the 15 Hz CamVid run (sequence 0016E5, frames
# 07959-08159, 101 frames) through the real-time pipeline, first serving only (`replay`), then
# serving while adapting with a profile (`adapt --realtime`), ROUNDS times in turn (default 3),
# and the ratios of the adapting run's figures to the serving-only run's of the same round.
#   benches/realtime.sh [PROFILE] [FPS]     (needs ../shared/data/camvid and python3)
# FPS other than 15 replays the same frames at that rate (timestamps spaced by 1/FPS).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-x86-64-cpu}
fps=${2:-15}
rounds=${ROUNDS:-3}
data=../shared/data/camvid
[ -d "$data" ] || { echo "realtime.sh: $data not found (the CamVid frames)" >&2; exit 2; }
cargo build --release -q
bin=./target/release/segadapt
src=(--source "folder:$data" --where sequence=0016E5 --where frame=07959..08159 --fps "$fps")
serve=()
adapt=()
for r in $(seq "$rounds"); do
    serve+=("$($bin replay --model models/camvid-day "${src[@]}" --realtime --json)")
    out=$(mktemp -d)
    adapt+=("$($bin adapt --model models/camvid-day --profile "$profile" "${src[@]}" --realtime \
        --out "$out" --json 2>/dev/null)")
    rm -rf "$out"
done
python3 - "$rounds" "$profile" "$fps" "${serve[@]}" "${adapt[@]}" <<'PY'
import json, sys
n, profile, fps = int(sys.argv[1]), sys.argv[2], sys.argv[3]
serve = [json.loads(a) for a in sys.argv[4:4 + n]]
adapt = [json.loads(a)["summary"] for a in sys.argv[4 + n:4 + 2 * n]]
print(f"{fps} Hz CamVid run, profile {profile}, {n} rounds (serving only, then adapting)")
print(f"{'round':<6}{'run':<10}{'in':>5}{'served':>8}{'dropped':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
      f"{'steps':>7}{'steps/s':>9}{'serve busy':>12}{'train busy':>12}")
for i, (s, a) in enumerate(zip(serve, adapt), 1):
    for name, x in [("serve", s), ("adapt", a)]:
        print(f"{i:<6}{name:<10}{x['frames_in']:>5}{x['frames_served']:>8}{x['frames_dropped']:>9}"
              f"{x['latency_ms_p50']:>9.1f}{x['latency_ms_p99']:>9.1f}{x['latency_ms_max']:>9.1f}"
              f"{x['train_steps']:>7}{x['train_steps_per_s']:>9.2f}"
              f"{100 * x['serve_busy']:>11.0f}%{100 * x['train_busy']:>11.0f}%")
    print(f"{'':<6}{'ratio':<10}{'':>5}{'':>8}{'':>9}"
          f"{a['latency_ms_p50'] / max(s['latency_ms_p50'], 1e-9):>9.2f}"
          f"{a['latency_ms_p99'] / max(s['latency_ms_p99'], 1e-9):>9.2f}"
          f"{a['latency_ms_max'] / max(s['latency_ms_max'], 1e-9):>9.2f}")
drop = sum(a["frames_dropped"] for a in adapt) / max(sum(a["frames_in"] for a in adapt), 1)
print(f"adapting: {100 * drop:.1f}% of frames dropped over all rounds")
PY
