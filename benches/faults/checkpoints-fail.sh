#!/usr/bin/env bash
# Checkpoints that cannot be written: once `adapt` has written its first checkpoints, the
# checkpoint folder is swapped for a plain file, so every later write fails as on a full or
# read-only disk. Adaptation must go on serving every frame, say that checkpoints are failing,
# and the checkpoints written before must stay whole.
#   benches/faults/checkpoints-fail.sh        (needs ../shared/data/camvid)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
profile="$work/profile.toml"
sed 's/^checkpoint_every = .*/checkpoint_every = 5/' firmware-configs/x86-64-cpu.toml > "$profile"
./target/release/segadapt --quiet adapt --model models/camvid-day --profile "$profile" \
  --source folder:../shared/data/camvid --where role=target --steps-per-frame 1 \
  --out "$work/run" > "$work/out.txt" 2> "$work/log.txt" &
pid=$!
until ls "$work/run/checkpoints" 2>/dev/null | grep -q 'step-00000010'; do sleep 0.2; done
mv "$work/run/checkpoints" "$work/kept"
touch "$work/run/checkpoints"
wait "$pid"
echo "exit: $?"
grep -E "frames [0-9]+ served|checkpoints could not" "$work/out.txt"
echo "errors logged: $(grep -c 'checkpoint not written' "$work/log.txt")"
grep -m1 'checkpoint not written' "$work/log.txt" | sed 's/^\[[^]]*\] //'
echo "checkpoints kept before the failure: $(ls "$work/kept" | tr '\n' ' ')"
test -f "$work/run/model.safetensors" && echo "adapted model written"
