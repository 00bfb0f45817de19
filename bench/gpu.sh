#!/usr/bin/env bash
# Every bench at real size on a CUDA machine, each output in its own file:
#   bash bench/gpu.sh [OUT_DIR]        (default bench-results/)
# Python: $PY if set; else .harness/venv/bin/python (running scripts/setup.sh first when the harness is
# missing, unless offline); else python3.
# Offline (STORYDIFFUSION_OFFLINE=1, or no .harness/ folder): scripts/setup.sh is never run (it would pip
# install and download), and ComfyUI is only taken from $COMFYUI_PATH (e.g. a carried copy of
# .harness/ComfyUI); online, $COMFYUI_PATH or .harness/ComfyUI. Benches that need ComfyUI (attention,
# ipadapter, identity, story_comic) are recorded as "skipped: no ComfyUI" when there is none, or as
# "skipped: ComfyUI does not import (...)" when a module it needs is missing; video as "skipped: no PyAV".
# STORYDIFFUSION_BENCH_QUICK=1: every bench in its smoke size (a check of this script, not a measurement).
# Each bench has its own time limit (600 s together, under 10 minutes with the checks); one that fails or
# runs out of time is recorded in its file and in summary.txt, and the others still run.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-bench-results}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$here"

offline=${STORYDIFFUSION_OFFLINE:-0}
[ -d .harness ] || offline=1
quick=${STORYDIFFUSION_BENCH_QUICK:-0}

if [ -n "${COMFYUI_PATH:-}" ]; then
  comfy=$COMFYUI_PATH
elif [ "$offline" = 1 ]; then
  comfy=
else
  comfy=$here/.harness/ComfyUI
fi

if [ -n "${PY:-}" ]; then
  py=$PY
else
  py=.harness/venv/bin/python
  if [ "$offline" != 1 ] && { [ ! -x "$py" ] || [ ! -f "$here/.harness/ComfyUI/main.py" ]; }; then
    timeout 900 bash scripts/setup.sh < /dev/null || echo "[gpu.sh] scripts/setup.sh failed" >&2
  fi
  [ -x "$py" ] || py=python3
fi
echo "[gpu.sh] python $py, offline=$offline, ComfyUI ${comfy:-none}" >&2
cuda=(--device cuda --dit-dtypes float16,bfloat16)
timeout 60 "$py" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(0), torch.__version__)' \
  > "$out/device.txt" 2>&1 || { echo "[gpu.sh] warning: torch sees no CUDA device, the benches will run on CPU" >&2; cuda=(); }
cat "$out/device.txt" >&2

: > "$out/summary.txt"
record() {  # record NAME TEXT
  printf '%-14s %s\n' "$1" "$2" | tee -a "$out/summary.txt"
}

# ComfyUI for the benches that need it: present, and importable with this python (bench/*.py find it
# through tests/comfy_env.py, which honours COMFYUI_PATH)
no_comfy=
if [ -z "$comfy" ] || [ ! -f "$comfy/main.py" ]; then
  no_comfy="skipped: no ComfyUI${comfy:+ at $comfy}"
else
  export COMFYUI_PATH=$(cd "$comfy" && pwd)
  if ! timeout 60 "$py" -c 'import sys; sys.path.insert(0, "tests"); import comfy_env; comfy_env.import_comfy(); import comfy.sd, comfy.samplers, comfy.model_patcher, comfy.supported_models; comfy_env.import_pack()' \
      > "$out/comfy_import.txt" 2>&1; then
    missing=$(grep -o "No module named '[^']*'" "$out/comfy_import.txt" | tail -1)
    no_comfy="skipped: ComfyUI does not import (${missing:-see comfy_import.txt})"
  fi
fi
no_av=
"$py" -c 'import av' 2>/dev/null || no_av="skipped: no PyAV (pip package av)"

run() {  # run NAME SECONDS ARGS...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS rc
  echo "[gpu.sh] $name: $*" >&2
  timeout --kill-after=10 "$limit" "$py" "$@" > "$out/$name.txt" 2> "$out/$name.err" < /dev/null
  rc=$?
  [ $rc -eq 124 ] && echo "[gpu.sh] $name: stopped after ${limit}s" >> "$out/$name.err"
  printf '%-14s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - start))" "$*" | tee -a "$out/summary.txt"
}
needs() {  # needs REASON NAME SECONDS ARGS...: run, unless REASON (non-empty) says why not
  local reason=$1; shift
  if [ -n "$reason" ]; then
    echo "$reason" > "$out/$1.err"
    record "$1" "$reason"
  else
    run "$@"
  fi
}

if [ "$quick" = 1 ]; then
  q_memory=(--quick --panels 2 --geometries sd15-512 --dit-panels 2) q_attention=(--quick) q_ipadapter=(--quick)
  q_grouping=(--quick --panels 2)
  q_video=(--frames 8 --memory-frames 16) q_identity=(--quick --small) q_motion=(--frames 4 --repeats 1)
  q_story=(--panels 2 --repeats 1)
else
  q_memory=() q_grouping=() q_attention=(--latent 64) q_ipadapter=(--latent 64) q_video=(--frames 120 --memory-frames 240)
  q_identity=(--quick) q_motion=(--frames 16 --repeats 3) q_story=(--panels 12 --repeats 3)
fi

# Consistent Self-Attention, one call at real geometry (SD1.5 512 px, SDXL 1024 px; 2..32 panels), fp16;
# then the DiT part, Flux.1 1024 px joint attention (2, 4, 8 panels; 1 and 2 chunks), fp16 and bf16
run memory 80 bench/bench_memory.py "${cuda[@]}" "${q_memory[@]}"
# query panels grouped under a memory budget: one CSA call, G=1 vs the automatic budget (a quarter of the free
# GPU memory), SD1.5 512 px, SDXL 1024 px, Flux.1 1024 px, 2..32 panels: time / FLOP estimate, extra MiB vs budget
run grouping 90 bench/bench_grouping.py "${q_grouping[@]}"
# CSA in a full-size SD1.5-shaped UNet at a 64x64 latent (512 px): batch, window and bank modes
needs "$no_comfy" attention 100 bench/bench_attention.py "${q_attention[@]}"
# per-frame IP-Adapter patch (tiny UNet; 64x64 latent = 512 px)
needs "$no_comfy" ipadapter 35 bench/bench_ipadapter.py "${q_ipadapter[@]}"
# Video Combine at 512x512 (encoding runs on the CPU)
needs "$no_av" video 40 bench/bench_video.py "${q_video[@]}"
# PhotoMaker Fuse with the real-size ViT-L/14 and CLIP-L + CLIP-G (CPU-bound; one repeat)
# (identity and story_comic load ComfyUI's node API, comfy_api, which imports PyAV)
needs "${no_comfy:-$no_av}" identity 40 bench/bench_identity.py "${q_identity[@]}"
# Semantic Motion Predictor, paper size (CPU-bound)
run motion 30 bench/bench_motion.py "${q_motion[@]}"
# a whole Flux.1 dev step (11.9 B random bf16 parameters, 1024 px) with and without CSA (G=1 and grouped): CUDA only
no_cuda=
[ ${#cuda[@]} -eq 0 ] && no_cuda="skipped: needs CUDA (a full-size Flux.1 dev model)"
[ "$quick" = 1 ] && no_cuda="skipped: not in a quick run"
needs "${no_comfy:-$no_cuda}" flux_model 160 bench/bench_flux_model.py --panels 2,4,8
# Story node encoding and comic pages
needs "${no_comfy:-$no_av}" story_comic 25 bench/bench_story_comic.py "${q_story[@]}"

echo "[gpu.sh] results in $out" >&2
cat "$out/summary.txt"
