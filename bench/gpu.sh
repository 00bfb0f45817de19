#!/usr/bin/env bash
# Every bench at real size on a CUDA machine, each output in its own file:
#   bash bench/gpu.sh [OUT_DIR]        (default bench-results/)
# Uses .harness/venv/bin/python (running scripts/setup.sh first when the harness is missing), else python3.
# Each bench has its own time limit (440 s together, under 8 minutes); one that fails or runs out of
# time is recorded in its file and in summary.txt, and the others still run.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-bench-results}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$here"

py=.harness/venv/bin/python
if [ ! -x "$py" ] || [ ! -f .harness/ComfyUI/main.py ]; then
  bash scripts/setup.sh || echo "[gpu.sh] scripts/setup.sh failed" >&2
fi
[ -x "$py" ] || py=python3
"$py" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(0), torch.__version__)' \
  | tee "$out/device.txt" || echo "[gpu.sh] warning: torch sees no CUDA device, the benches will run on CPU" >&2

: > "$out/summary.txt"
run() {  # run NAME SECONDS ARGS...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS rc
  echo "[gpu.sh] $name: $*" >&2
  timeout --kill-after=10 "$limit" "$py" "$@" > "$out/$name.txt" 2> "$out/$name.err"
  rc=$?
  [ $rc -eq 124 ] && echo "[gpu.sh] $name: stopped after ${limit}s" >> "$out/$name.err"
  printf '%-14s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - start))" "$*" | tee -a "$out/summary.txt"
}

# Consistent Self-Attention, one call at real geometry (SD1.5 512 px, SDXL 1024 px; 2..32 panels), fp16
run memory 90 bench/bench_memory.py --device cuda
# CSA in a full-size SD1.5-shaped UNet at a 64x64 latent (512 px): batch, window and bank modes
run attention 140 bench/bench_attention.py --latent 64
# per-frame IP-Adapter patch (tiny UNet; 64x64 latent = 512 px)
run ipadapter 40 bench/bench_ipadapter.py --latent 64
# Video Combine at 512x512 (encoding runs on the CPU)
run video 50 bench/bench_video.py --frames 120 --memory-frames 240
# PhotoMaker Fuse with the real-size ViT-L/14 and CLIP-L + CLIP-G (CPU-bound; one repeat)
run identity 50 bench/bench_identity.py --quick
# Semantic Motion Predictor, paper size (CPU-bound)
run motion 40 bench/bench_motion.py --frames 16 --repeats 3
# Story node encoding and comic pages
run story_comic 30 bench/bench_story_comic.py --panels 12 --repeats 3

echo "[gpu.sh] results in $out" >&2
cat "$out/summary.txt"
