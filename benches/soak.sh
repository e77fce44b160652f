#!/usr/bin/env bash
# Soak: the 15 Hz CamVid drive (101 frames) looped until FRAMES frames (default 10,000) with
# adaptation on (the profile's cadence, replayed as fast as possible), printing the heap and the
# resident set every 500 frames. Memory must stay flat however long the drive.
#   benches/soak.sh [PROFILE] [FRAMES]        (needs ../shared/data/camvid)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-x86-64-cpu}
frames=${2:-10000}
loops=$(( (frames + 100) / 101 ))
cargo build --release --quiet
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
./target/release/segadapt --quiet adapt --model models/camvid-day --profile "$profile" \
  --source folder:../shared/data/camvid --where sequence=0016E5 --where frame=07959..08159 \
  --fps 15 --loops "$loops" --out "$out/run" 2>&1 \
  | grep -E "[0-9]+ frames: heap|training steps|memory:" | sed 's/^\[[^]]*\] //'
