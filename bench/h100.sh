#!/usr/bin/env bash
# The GPU speed run (bench/README.md): real 3.5B configuration with random weights, eager vs fast path,
# 60 s and 240 s, 27 and 60 steps, batch 1 and 4, low-VRAM mode, then torch.compile. At most 9.3 minutes on one
# H100; each step has its own time limit and writes its own JSON, so a slow step loses only itself.
#   bash bench/h100.sh [output folder, default $OUT or bench/results]
set -u
out="${1:-${OUT:-bench/results}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
bench() { local limit=$1; shift; timeout "$limit" "$py" -m bench.rtf --random-weights --out "$out" "$@" 2>&1 | tee -a "$out/h100.log"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv | tee "$out/h100.log"
# 1. the official baseline's four settings, batch 1: eager (official call pattern) vs fast, same inputs
bench 180 --seconds 60 240 --steps 27 60 --batch 1 --compare --warmup 1 --repeats 2
# 2. batch 4: compared at 60 s, fast alone at 240 s
bench 70 --seconds 60 --steps 27 --batch 4 --compare --warmup 1 --repeats 1
bench 50 --seconds 240 --steps 27 --batch 4 --warmup 1 --repeats 1
# 3. low-VRAM mode: components on the CPU, each moved in for its phase (target: 240 s / 27 steps under 8 GiB)
bench 80 --seconds 240 --steps 27 --low-vram --compare --warmup 1 --repeats 1
# 4. torch.compile of the transformer blocks (the warm-up run compiles)
bench 170 --seconds 240 --steps 27 --compile --warmup 1 --repeats 2
