#!/usr/bin/env bash
# The GPU speed run (bench/README.md): real 3.5B configuration with random weights, eager vs fast path,
# 60 s and 240 s, 27 and 60 steps, batch 1 and 4, low-VRAM mode (--cpu-offload), then torch.compile; beside it,
# on the CPU, the static memory accounting of bench/memory.py; last, ACE-Step 1.5 turbo (8 steps) and base (50
# steps) with bench/rtf15.py. At most 7.9 minutes on one H100 (the limits add up to 470 s); each step has its own time limit and writes its own JSON, so a slow step loses only itself.
#   bash bench/h100.sh [output folder, default $OUT or bench/results]
set -u
out="${1:-${OUT:-bench/results}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
bench() { local limit=$1; shift; timeout "$limit" "$py" -m bench.rtf --random-weights --out "$out" "$@" 2>&1 | tee -a "$out/h100.log"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv | tee "$out/h100.log"
# 0. static accounting of the low-VRAM peak (meta tensors, CPU only; runs while the GPU steps run)
timeout 150 "$py" -m bench.memory --seconds 240 --out "$out/memory-accounting.json" > "$out/memory.log" 2>&1 &
accounting=$!
# 1. the official baseline's four settings, batch 1: eager (official call pattern) vs fast, same inputs
bench 150 --seconds 60 240 --steps 27 60 --batch 1 --compare --warmup 1 --repeats 2
# 2. batch 4: compared at 60 s, fast alone at 240 s
bench 55 --seconds 60 --steps 27 --batch 4 --compare --warmup 1 --repeats 1
bench 40 --seconds 240 --steps 27 --batch 4 --warmup 1 --repeats 1
# 3. low-VRAM mode: components in pinned CPU memory, each moved in for its phase (target: 240 s / 27 steps < 8 GB)
bench 70 --seconds 240 --steps 27 --low-vram --compare --warmup 1 --repeats 1
# 4. torch.compile of the transformer blocks (the warm-up run compiles; the first-call time is in the log)
bench 115 --seconds 240 --steps 27 --compile --warmup 1 --repeats 2
# 5. ACE-Step 1.5 at its real configuration (random weights): turbo 8 steps and base 50 steps, 60 s and 240 s
timeout 40 "$py" -m bench.rtf15 --random-weights --variants turbo base --seconds 60 240 --warmup 1 --repeats 1 \
    --out "$out" 2>&1 | tee -a "$out/h100.log"
wait "$accounting"
tee -a "$out/h100.log" < "$out/memory.log"
