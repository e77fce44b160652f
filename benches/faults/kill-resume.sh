#!/usr/bin/env bash
# Kill and resume: `adapt` on the dusk frames (three passes, one step per frame) is SIGKILLed
# KILLS times (default 20) at random moments and restarted each time with the same command;
# the last start runs to the end. It must end with the step count and the weights of a run
# that was never interrupted, leave no partial file behind, and every checkpoint must load.
#   benches/faults/kill-resume.sh [KILLS]      (needs ../shared/data/camvid)
set -euo pipefail
cd "$(dirname "$0")/../.."
kills=${1:-20}
cargo build --release --quiet
bin=./target/release/segadapt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Checkpoints every 10 steps, so each restart keeps most of what the killed one did.
profile="$work/profile.toml"
sed 's/^checkpoint_every = .*/checkpoint_every = 10/' firmware-configs/x86-64-cpu.toml > "$profile"
cmd=("$bin" --quiet adapt --model models/camvid-day --profile "$profile"
  --source folder:../shared/data/camvid --where role=target --loops 3 --steps-per-frame 1 --json)
run() { "${cmd[@]}" --out "$1"; }
t0=$(date +%s)
run "$work/whole" > "$work/whole.json" 2>/dev/null
whole_s=$(( $(date +%s) - t0 ))
echo "uninterrupted: $(grep -o '"train_steps":[0-9]*' "$work/whole.json") in ${whole_s}s"
for i in $(seq 1 "$kills"); do
  # The binary itself in the background, so the kill reaches it and not a subshell.
  "${cmd[@]}" --out "$work/killed" > /dev/null 2>&1 &
  pid=$!
  # Anywhere from start-up (the plan is being measured) to a tenth of the drive in.
  sleep "$(awk -v s="$RANDOM" -v w="$whole_s" 'BEGIN { srand(s); printf "%.1f", 1 + rand() * w / 10 }')"
  if kill -9 "$pid" 2>/dev/null; then live=killed; else live="had already ended"; fi
  wait "$pid" 2>/dev/null || true
  newest=$(ls "$work/killed/checkpoints" 2>/dev/null | grep -c '^step-' || true)
  echo "kill $i ($live): $(ls "$work/killed/checkpoints" 2>/dev/null | grep '^step-' | tail -1) ($newest kept)"
done
run "$work/killed" > "$work/killed.json" 2>"$work/killed.log"
grep -E "resuming|removed" "$work/killed.log" | sed 's/^\[[^]]*\] //' | tail -3
echo "resumed:       $(grep -o '"train_steps":[0-9]*' "$work/killed.json") (steps of the last start)"
left=$(find "$work/killed" -name '*.tmp' | wc -l)
echo "partial files left: $left"
python3 - "$work/whole/model.safetensors" "$work/killed/model.safetensors" <<'PY'
import struct, sys
def tensors(p):
    b = open(p, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    import json
    h = json.loads(b[8:8 + n]); h.pop("__metadata__", None)
    return {k: b[8 + n + v["data_offsets"][0]: 8 + n + v["data_offsets"][1]] for k, v in h.items()}
a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
same = a.keys() == b.keys() and all(a[k] == b[k] for k in a)
print("final weights identical to the uninterrupted run's:", same)
sys.exit(0 if same else 1)
PY
last_whole=$(ls "$work/whole/checkpoints" | tail -1)
last_killed=$(ls "$work/killed/checkpoints" | tail -1)
echo "final checkpoint: uninterrupted $last_whole, killed $last_killed"
[[ $last_whole == "$last_killed" && $left == 0 ]]
