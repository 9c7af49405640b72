#!/usr/bin/env bash
# The GPU checks as one prepared run (about 9 minutes on one H200), from the repo root:
#
#   OUT=DIR VAE_SECONDS=100 [PARTS="1 5 2 7 4 3 6"] bash scripts/gpu_check.sh
#
# 1. the CUDA smoke tests (one mini-batch of each training stage, bf16, the DiT compiled);
# 2. bench/train.py: dit-xl/2 on 32x32 latents (256 px), bf16, eager, against diffusers' DiT,
#    with step time against token count and batch size;
# 3. bench/sample.py: dit-xl/2, 256 px, 28 Euler steps with CFG, bf16, against diffusers;
# 4. the shipped VAE's architecture trained from scratch on the GPU (configs/vae_f8c16_gpu.json)
#    for as many steps as fit in VAE_SECONDS (timed by scripts/gpu_vae_steps.py), then exported;
# 5. bench/train.py as in 2, each transformer block of both models compiled;
# 6. a short DiT run from a latent cache through train.py, then inference.py on its checkpoint,
#    and the bare training step of its model at its buckets (bench/train.py);
# 7. bench/train.py as in 2, ours compiled against diffusers' DiT as it ships (eager);
# 8. the VAE stage of 4 for 400 steps without and with its validation folder (step rates).
#
# PARTS picks the parts and their order (the default runs them all, 1 to 8), so that the ones
# that matter most can go first when the machine's time is short.
# Expects the photographs in $GPU_DATA/vae_mix (training) and $GPU_DATA/heldout (README, "GPU
# checks"). Wheels in .whl/ (diffusers and what it needs) are installed first when present.
# Everything is logged to $OUT/log.txt; JSON reports, samples and the runs' TensorBoard files
# go into $OUT/report.tgz (re-packed after every part), the VAE export into $OUT/vae/. Each part
# has its own time limit, and a failing part does not stop the others.
set -u
OUT=${OUT:-runs/gpu_check}
DATA=${GPU_DATA:-.gpu_data}
VAE_SECONDS=${VAE_SECONDS:-100}
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/gpu_check}
PARTS=${PARTS:-1 2 3 4 5 6 7 8}
REPORT="$WORK/report"
mkdir -p "$OUT" "$REPORT"
export PYTHONUNBUFFERED=1 LDM_CACHE_DIR="$WORK/cache"
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" .whl/*.whl && export PYTHONPATH="$WORK/site"
fi
log() { echo "== $(date +%T) $*"; }
pack() { tar -C "$REPORT" -czf "$OUT/report.tgz" .; }

# Re-save PNGs uncompressed (lossless, the same pixels): decoding is the VAE loader's main cost.
UNCOMPRESS='
import shutil, sys
from pathlib import Path
from PIL import Image
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for f in sorted(src.rglob("*")):
    if f.is_file():
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix.lower() == ".png":
            Image.open(f).save(out, compress_level=0)
        else:
            shutil.copy2(f, out)
'

part1() {  # CUDA smoke tests
    timeout 150 $PY -m pytest -q -p no:cacheprovider -k cuda -rs \
        tests/training/test_dit_stage.py tests/training/test_vae_stage.py
}

part2() {  # training throughput, dit-xl/2, 32x32 latents, bf16, eager
    timeout 120 $PY bench/train.py --models dit-xl/2 --latents 32x32 --dtypes bfloat16 \
        --batch 64 --repeats 3 --steps 5 --peak-size 8192 --scaling-latents 16x16 32x32 \
        64x64 --scaling-batch 16 --scaling-batches 8 32 128 | tee "$REPORT/bench_train_eager.txt"
}

part3() {  # sampling throughput, dit-xl/2, 256 px, bf16
    timeout 90 $PY bench/sample.py --model dit-xl/2 --devices cuda --dtype bfloat16 --batch 8 \
        --repeats 3 | tee "$REPORT/bench_sample.txt"
}

vae_mix() {  # the VAE photographs, uncompressed, in $WORK/vae_mix (once)
    [ -d "$WORK/vae_mix" ] || $PY -c "$UNCOMPRESS" "$DATA/vae_mix" "$WORK/vae_mix"
}

part4() {  # the shipped VAE's architecture trained from scratch for a fixed time
    log "VAE_SECONDS=${VAE_SECONDS}"
    vae_mix
    # it trains the real stage for a few hundred steps (about 25 s on an H200) to time them
    timeout 120 $PY scripts/gpu_vae_steps.py --config configs/vae_f8c16_gpu.json \
        --dataset "$WORK/vae_mix" --eval-dataset "$DATA/heldout" --seconds "$VAE_SECONDS" \
        | tee "$REPORT/vae_steps.txt"
    # without an estimate: 8 steps/s, below the 11 the H200 ran at, so the schedule ends
    steps=$(tail -n 1 "$REPORT/vae_steps.txt" | $PY -c \
        "import json, sys; print(json.load(sys.stdin)['max_steps'])" \
        || echo $((VAE_SECONDS * 8)))
    log "VAE max_steps $steps"
    timeout -s TERM $((VAE_SECONDS + 30)) $PY train.py --config configs/vae_f8c16_gpu.json \
        --dataset "$WORK/vae_mix" --eval-dataset "$DATA/heldout" --max-steps "$steps" \
        --run-dir "$WORK/runs/vae_gpu"
    if [ ! -f "$WORK/runs/vae_gpu/vae/diffusion_pytorch_model.safetensors" ]; then
        log "VAE run stopped early: exporting its newest checkpoint"
        timeout 60 $PY train.py --export "$WORK/runs/vae_gpu"
    fi
    mkdir -p "$OUT/vae"
    cp "$WORK/runs/vae_gpu/vae/"* "$OUT/vae/"
    tar -C "$WORK/runs/vae_gpu" -czf "$REPORT/vae_gpu_run.tgz" tb config.json
}

part5() {  # training throughput, dit-xl/2, 32x32 latents, bf16, both compiled
    timeout 170 $PY bench/train.py --models dit-xl/2 --latents 32x32 --dtypes bfloat16 \
        --batch 64 --compile --repeats 3 --steps 5 --peak-size 8192 --scaling-latents \
        --scaling-batches | tee "$REPORT/bench_train_compiled.txt"
}

part6() {  # a short DiT run from the latent cache, then inference.py
    timeout 90 $PY train.py --dataset synthetic:128 --classes --model dit-s/2 \
        --resolution 256 --batch-size 32 --max-steps 100 --log-every 10 --eval-every 100 \
        --sample-every 100 --run-dir "$WORK/runs/dit_gpu"
    timeout 40 $PY inference.py --checkpoint "$WORK/runs/dit_gpu" --num-samples 4 \
        --size 384x256 --class-label 1 --device cuda --dtype bf16 --out "$REPORT/samples" \
        --no-progress --json
    tar -C "$WORK/runs/dit_gpu" -czf "$REPORT/dit_gpu_run.tgz" tb config.json
    # the bare step (forward, backward, fused AdamW) at the run's two buckets, 160x352 and
    # 272x224 px: against the run's samples/s, what the loop around it costs (data, clipping,
    # the non-finite guard's sync, EMA, logging)
    timeout 60 $PY bench/train.py --models dit-s/2 --latents 20x44 34x28 --dtypes bfloat16 \
        --batch 32 --repeats 3 --steps 20 --memory-steps 0 --scaling-latents --scaling-batches \
        | tee "$REPORT/bench_train_dit_s.txt"
}

part7() {  # training throughput, dit-xl/2, 32x32 latents, bf16, ours compiled, diffusers eager
    timeout 120 $PY bench/train.py --models dit-xl/2 --latents 32x32 --dtypes bfloat16 \
        --batch 64 --compile ours --repeats 3 --steps 5 --peak-size 8192 --scaling-latents \
        --scaling-batches | tee "$REPORT/bench_train_ours_compiled.txt"
}

part8() {  # the VAE stage's step rate without and with a validation folder, 400 steps each
    # On 2026-11-30 it stepped at 0.063 s without --eval-dataset and 0.092 s with one.
    vae_mix
    for eval in none heldout; do
        extra=()
        [ "$eval" = heldout ] && extra=(--eval-dataset "$DATA/heldout")
        timeout 90 $PY train.py --config configs/vae_f8c16_gpu.json --dataset "$WORK/vae_mix" \
            "${extra[@]}" --max-steps 400 --run-dir "$WORK/runs/vae_eval_$eval" >/dev/null
    done
    $PY scripts/loss_curves.py "$WORK/runs/vae_eval_none" "$WORK/runs/vae_eval_heldout" \
        --tags train/samples_per_s train/data_wait_fraction --every 50 \
        | tee "$REPORT/vae_eval_rates.txt"
}

main() {
    log environment
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c "import os, torch, diffusers; print('torch', torch.__version__, 'diffusers',
diffusers.__version__, torch.cuda.get_device_name(), 'cpus', os.cpu_count())"
    for p in $PARTS; do
        if [ "$(type -t "part$p")" != function ]; then
            log "no part $p (parts are 1 to 8)"
            continue
        fi
        log "part $p: $(sed -n "s/^part$p() {  # //p" "${BASH_SOURCE[0]}")"
        "part$p"
        pack
    done
    log done
}

main 2>&1 | tee "$OUT/log.txt"
