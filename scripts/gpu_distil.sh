#!/usr/bin/env bash
# Every distillation method from the attention teacher, side by side on one GPU, plus the teacher trained on, for
# a fixed wall-clock budget. Each run gets SIGTERM at the deadline, finishes its iteration, saves its state and
# exports its EMA products (training/trainer.py); the products, logs, sample grids and snapshots are then packed
# into PACK_DIR as tar parts of at most 15 MB (unpack: cat PACK_DIR/runs.tgz.part-* | tar xz).
#
# usage: scripts/gpu_distil.sh RUN_ROOT SECONDS [PACK_DIR]
#   PYTHON=python3 (an interpreter with torch, numpy, safetensors, tqdm, pillow), ONESTEP_FASHION_MNIST=<IDX dir>
#   EXTRA_SET="train.steps=3 ..." adds --set overrides to every run, EXTRA_SET_PAIRS to the runs with a teacher pair
#   cache (Denoising Student, SFERD, Adv-KD): smoke tests on a CPU
set -u
root=${1:?RUN_ROOT}
secs=${2:?SECONDS}
pack=${3:-}
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
mkdir -p "$root"

sets=()
for kv in ${EXTRA_SET:-}; do sets+=(--set "$kv"); done
pair_sets=()
for kv in ${EXTRA_SET_PAIRS:-}; do pair_sets+=(--set "$kv"); done

# name | onestep arguments
runs=(
  "teacher|train --preset fmnist-teacher-attn-gpu"
  "sid|distill --method sid --preset fmnist-sid-attn-gpu"
  "sida|distill --method sida --preset fmnist-sida-attn-gpu"
  "emd|distill --method emd --preset fmnist-emd-attn-gpu"
  "denoising-student|distill --method denoising-student --preset fmnist-denoising-student-attn-gpu"
  "sferd|distill --method sferd --preset fmnist-sferd-attn-gpu"
  "adv-kd|distill --method adv-kd --preset fmnist-adv-kd-attn-gpu"
)

{
  date -u +"start %FT%TZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  "$py" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  nproc
} > "$root/machine.txt" 2>&1

pids=()
for r in "${runs[@]}"; do
  name=${r%%|*}
  args=${r#*|}
  extra=("${sets[@]}")
  case $name in denoising-student|sferd|adv-kd) extra+=("${pair_sets[@]}") ;; esac
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 timeout -s TERM -k 90 "$secs" "$py" -m onestep.cli $args --run-dir "$root/$name" \
    --device "$device" --metric classifier "${extra[@]}" > "$root/$name.log" 2>&1 &
  pids+=($!)
done

# GPU load every 30 s while the runs last
( while sleep 30; do
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
  done ) >> "$root/gpu_load.csv" &
mon=$!

rcs=()
for p in "${pids[@]}"; do wait "$p"; rcs+=($?); done
kill "$mon" 2>/dev/null
{
  date -u +"end %FT%TZ"
  for i in "${!runs[@]}"; do echo "${runs[$i]%%|*} exit ${rcs[$i]}"; done  # 124 = stopped at the deadline
} >> "$root/machine.txt"

if [ -n "$pack" ]; then
  mkdir -p "$pack"
  # products and records only: no optimizer states, no pair caches; tqdm's carriage-return lines trimmed
  for r in "${runs[@]}"; do
    name=${r%%|*}
    tr '\r' '\n' < "$root/$name.log" | grep -v '^\s*$' | tail -n 200 > "$root/$name.tail.log"
  done
  # at most ~58 MB back: thin the snapshots (every other one, the last kept) until the products fit
  "$py" - "$root" <<'PY'
import sys
from pathlib import Path

root = Path(sys.argv[1])
keep = lambda p: "checkpoints" not in p.parts
total = lambda: sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and keep(p) and p.suffix != ".log")
while total() > 58e6:
    snaps = sorted(root.glob("*/snapshots/model-*.safetensors"))
    runs = {p.parent for p in snaps if len(list(p.parent.glob("model-*.safetensors"))) > 1}
    if not runs:
        break
    for d in runs:
        files = sorted(d.glob("model-*.safetensors"))
        for p in files[-2::-2]:
            p.unlink()
            p.with_suffix(".json").unlink(missing_ok=True)
print(f"packing {total() / 1e6:.1f} MB")
PY
  (cd "$root" && find . -type f \( -name '*.txt' -o -name '*.csv' -o -name '*.tail.log' -o -name 'model*' \
      -o -name 'log.jsonl' -o -name 'config.json' -o -path '*/snapshots/*' -o -path '*/samples/*' \) \
      -not -path '*/checkpoints/*' | sort | tar czf - -T -) | split -b 15M - "$pack/runs.tgz.part-"
  ls -l "$pack"
fi
