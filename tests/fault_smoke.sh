#!/usr/bin/env bash
# Faults while training, through the `ultramem` command (docs/reliability.md):
#  1. kill -9 while a checkpoint is being written, several times: each time the last complete checkpoint
#     loads, the next run removes the dead writer's temporary, and the resumed run ends bit-identical to an
#     uninterrupted one;
#  2. a full disk while saving (a file-size limit: writes fail as on a full disk, with EFBIG instead of
#     ENOSPC): the run stops with an error naming the checkpoint, the previous checkpoint is unchanged and
#     loads, no partial file is left;
#  3. --nproc 2 with a rank killed, and with a rank stopped (SIGSTOP): the job ends nonzero within the
#     timeout, naming the failed rank.
# Usage: fault_smoke.sh PATH/TO/ultramem
set -euo pipefail
um="$1"
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
PY=/usr/bin/python3

mkdir -p "$work/corpus"
for d in 1 2 3 4; do
  for i in $(seq 1 150); do echo "The people of district $d will vote on measure $((i % 7)) in the spring."; done \
    > "$work/corpus/doc$d.txt"
done
"$um" prepare --input "$work/corpus" --out "$work/data" --vocab 300 --val-fraction 0.25 > /dev/null
# Wide enough that a checkpoint (weights and AdamW moments, ~19 MB) takes a while to write.
cat > "$work/model.json" <<'JSON'
{"model": {"name": "fault", "vocab_size": 300, "d_model": 256, "n_layers": 2, "n_heads": 4, "max_seq_len": 32,
           "ffn_hidden": 1024, "memory": {"kind": "ultramem", "placement": "1:2",
           "ultramem": {"n": 16, "E": 4, "Dk": 16, "Dv": 64, "r": 2, "C": 2, "H": 2, "m": 4}}},
 "train": {"steps": 10, "batch_size": 2, "seq_len": 32, "lr": 0.003, "eval_every": 5, "eval_batches": 2,
           "log_every": 0, "checkpoint_every": 1}}
JSON
train() { "$um" --threads 1 train "$work/model.json" --data "$work/data" "$@"; }
val_loss() {  # the full-precision validation loss of a checkpoint
  "$um" --threads 1 eval "$1" --batch-size 2 --seq-len 32 --max-batches 4 | grep -o '"val_loss": *[-0-9.e]*'
}

# --- 1. kill -9 mid-save ------------------------------------------------------------------------------
train --out "$work/ref" > "$work/ref.log" 2>&1 || fail "the uninterrupted run: $(cat "$work/ref.log")"
ref=$(val_loss "$work/ref/checkpoint.safetensors")

kills=0
for attempt in 1 2 3; do
  resume=()
  [ -f "$work/run/checkpoint.safetensors" ] && resume=(--resume)
  # Started directly (not through a shell function), so that $! is the training process itself.
  "$um" --threads 1 train "$work/model.json" --data "$work/data" --out "$work/run" "${resume[@]}" > "$work/run.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  # Kill the moment a temporary checkpoint file exists, i.e. while a save is writing it: the second save
  # of the run, so that its first one is complete and each run gets further.
  $PY - "$work/run" "$pid" <<'PY' || fail "attempt $attempt: no second save to kill during: $(cat "$work/run.log")"
import glob, os, sys, time
folder, pid = sys.argv[1], int(sys.argv[2])
seen, was = 0, False
deadline = time.time() + 120
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(1)
    now = bool(glob.glob(os.path.join(folder, "checkpoint.safetensors.tmp.*")))
    if now and not was:
        seen += 1
        if seen == 2:
            os.kill(pid, 9)
            sys.exit(0)
    was = now
sys.exit(2)
PY
  if wait "$pid" 2>/dev/null; then fail "a run killed with -9 exited 0"; fi
  kills=$((kills + 1))
  ls "$work/run" | grep -q '\.tmp\.' || fail "kill $kills did not land during a save (no temporary file): $(ls -la "$work/run")"
  # The last complete checkpoint loads (its checksum verified), whatever the kill interrupted.
  val_loss "$work/run/checkpoint.safetensors" > /dev/null || fail "after kill $kills the checkpoint does not load"
done
"$um" --threads 1 train "$work/model.json" --data "$work/data" --out "$work/run" --resume > "$work/run.log" 2>&1 \
  || fail "the resumed run failed: $(cat "$work/run.log")"
grep -q "final: step 10" "$work/run.log" || fail "the run did not finish: $(cat "$work/run.log")"
if ls "$work/run" | grep -q '\.tmp\.'; then fail "temporaries of killed saves are left: $(ls "$work/run")"; fi
got=$(val_loss "$work/run/checkpoint.safetensors")
[ "$got" = "$ref" ] || fail "resumed after $kills kills: $got, uninterrupted: $ref"
echo "fault_smoke: $kills kills during saves, resume exact ($got)"

# --- 2. a full disk while saving ------------------------------------------------------------------------
cp -r "$work/ref" "$work/full"
before=$(md5sum < "$work/full/checkpoint.safetensors")
size_kib=$(( $(stat -c %s "$work/full/checkpoint.safetensors") / 1024 ))
# A file-size limit of half a checkpoint: the next save's write fails part way. SIGXFSZ is ignored so that
# the write returns the error instead of killing the process.
if (trap '' XFSZ; ulimit -f $((size_kib / 2)); exec "$um" --threads 1 train "$work/model.json" --data "$work/data" \
      --out "$work/full" --resume --steps 12) > "$work/full.log" 2>&1; then
  fail "a save to a full disk succeeded: $(cat "$work/full.log")"
fi
grep -q "checkpoint.safetensors" "$work/full.log" || fail "the full-disk error does not name the checkpoint: $(cat "$work/full.log")"
grep -q "File too large" "$work/full.log" || fail "the full-disk error does not say why: $(cat "$work/full.log")"
grep -q "frame #" "$work/full.log" && fail "a C++ stack trace: $(cat "$work/full.log")"
[ "$(md5sum < "$work/full/checkpoint.safetensors")" = "$before" ] || fail "the full disk changed the last checkpoint"
if ls "$work/full" | grep -q '\.tmp\.'; then fail "a partial file is left: $(ls "$work/full")"; fi
val_loss "$work/full/checkpoint.safetensors" > /dev/null || fail "the last checkpoint does not load after a full disk"
echo "fault_smoke: a full disk leaves the last checkpoint intact"

# --- 3. --nproc 2: a rank killed, a rank stopped ---------------------------------------------------------
for how in KILL STOP; do
  out="$work/dist_$how"
  start=$(date +%s.%N)
  "$um" --threads 1 train "$work/model.json" --data "$work/data" --out "$out" --nproc 2 --dist-timeout 5 \
    --steps 100000 --set checkpoint_every=0 > "$out.log" 2>&1 &
  launcher=$!
  pids+=("$launcher")
  # Once the ranks train (a step logged or 20 s), signal rank 1.
  for _ in $(seq 1 400); do grep -q "distributed: 2 ranks" "$out.log" 2>/dev/null && break; sleep 0.05; done
  sleep 1
  rank1=$(cat /proc/"$launcher"/task/*/children 2>/dev/null | tr ' ' '\n' | grep . | sort -n | tail -1)
  [ -n "$rank1" ] || fail "$how: no rank process found"
  signalled=$(date +%s.%N)
  kill -"$how" "$rank1"
  if wait "$launcher"; then fail "$how: the job exited 0"; fi
  took=$($PY -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$signalled" "$(date +%s.%N)")
  if [ "$how" = KILL ]; then
    grep -q "ultramem: error: rank 1 failed" "$out.log" || fail "KILL: the killed rank 1 is not the one named: $(tail -5 "$out.log")"
  else
    grep -q "rank 1 is stopped" "$out.log" || fail "STOP: the stopped rank 1 is not named: $(tail -5 "$out.log")"
  fi
  # Bounded: the timeout (5 s), then the launcher's grace (5 s) and SIGKILL 5 s later, and slack for a
  # loaded machine.
  $PY -c "import sys; sys.exit(0 if float(sys.argv[1]) < 25 else 1)" "$took" \
    || fail "$how: the job took $took s to end after the signal"
  echo "fault_smoke: rank 1 ${how}ed: the job ended in $took s, nonzero"
done
echo "fault smoke: ok"
