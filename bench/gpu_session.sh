#!/usr/bin/env bash
# One GPU session, prepared in advance: every bench on CUDA, then the world models trained
# on the GPU. Run from the repository root on a machine with torch + CUDA:
#
#     OUT=/tmp/gpu bash bench/gpu_session.sh            # the real session
#     SMOKE=1 OUT=/tmp/gpu bash bench/gpu_session.sh    # tiny sizes on cpu (checks the script)
#
# Needs zarr, dask, open_clip_torch importable (a `.whl/` folder of wheels is installed
# into /tmp/site first when present). Every step has its own time limit, so one that
# fails or runs long does not cost the others. Output: $OUT/session.log, the world-train
# metrics of each run, and the autoencoder weights of the long runs (tar).
set -u
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
PY=${PY:-python3}
DEV=cuda
[ "${SMOKE:-0}" = 1 ] && DEV=cpu

step() {  # step NAME SECONDS COMMAND...: time-limited, output to the log
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    echo "=== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$LOG"
}

{ nvidia-smi -L 2>&1 || true; $PY -c "import torch, zarr, dask, open_clip; print('torch', \
torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(), \
'zarr', zarr.__version__, 'dask', dask.__version__, 'open_clip', open_clip.__version__)"; } \
    >>"$LOG" 2>&1

if [ "${SMOKE:-0}" = 1 ]; then
    step generator 300 $PY bench/bench_generator.py --device $DEV --quick --resolutions 256
    step train 300 $PY bench/bench_train.py --device $DEV --quick
    step edit 300 $PY bench/bench_edit.py --device $DEV --quick --rows 2000 --images 16 --repeats 1
    step encode 300 $PY bench/bench_encode.py --device $DEV --quick --only sample
    step precision 300 $PY bench/bench_precision.py --device $DEV --quick --batch 256
    step datapath 300 $PY bench/bench_datapath.py --device $DEV --quick --repeats 1 --only sample
    step generator-compile 300 $PY bench/bench_generator.py --device $DEV --quick \
        --resolutions 64 --batch 2 --compile --bf16
    WT="--set world_train.n_train=64 --set world_train.n_heldout=32"
    A_MIN=0.05
    B_MIN=0.05
    ITS=20
else
    step generator 90 $PY bench/bench_generator.py --device $DEV --batch 8
    step train 90 $PY bench/bench_train.py --device $DEV --rows 8192 --steps 50 --bf16
    step edit 90 $PY bench/bench_edit.py --device $DEV --rows 50000 --images 256 --repeats 3
    step encode 90 $PY bench/bench_encode.py --device $DEV
    # issue 17: bf16 (mapper + generator), the data path alone, the generator at the render
    # batch with channels_last + torch.compile (CUDA graphs) against the cuDNN roofline
    step precision 90 $PY bench/bench_precision.py --device $DEV
    step datapath 120 $PY bench/bench_datapath.py --device $DEV
    step generator-b32 180 $PY bench/bench_generator.py --device $DEV --batch 32 --compile --bf16
    WT=""
    A_MIN=2.0
    B_MIN=1.2
    ITS=100000
fi

# 1. The world models from their seeds, default config, on the GPU (the reproduction time).
step world-repro 180 $PY -m pipeline world train --out /tmp/wt-repro $WT \
    --set world_train.device=$DEV --set world_train.threads=8 \
    --set world_train.ae_max_minutes=1.0 --set world_train.clip_max_minutes=1.0
cp /tmp/wt-repro/metrics.json "$OUT/repro_metrics.json" 2>/dev/null

# 2. Long autoencoder runs (the CLIP is the committed one, so the combined metrics run).
#    A: toRGB styles fixed, from the seed: colour and background must live in conv channels.
#    B: the committed autoencoder continued with a larger batch.
mkdir -p /tmp/wt-a /tmp/wt-b
cp weights/world/clip.* /tmp/wt-a/
cp weights/world/clip.* /tmp/wt-b/
step ae-fixed-torgb 200 $PY -m pipeline world train --only autoencoder --out /tmp/wt-a $WT \
    --set world_train.device=$DEV --set world_train.threads=8 \
    --set world_train.ae_torgb_styles=fixed --set world_train.ae_batch=64 \
    --set world_train.ae_grad_l1=0.2 --set world_train.ae_iterations=$ITS \
    --set world_train.ae_max_minutes=$A_MIN
tar -cf "$OUT/ae_fixed.tar" -C /tmp/wt-a generator.safetensors generator.json \
    e4e.safetensors e4e.json metrics.json 2>>"$LOG"
step ae-continued 140 $PY -m pipeline world train --only autoencoder --out /tmp/wt-b $WT \
    --set world_train.device=$DEV --set world_train.threads=8 \
    --set world_train.ae_init=weights/world --set world_train.ae_lr=0.0003 \
    --set world_train.ae_batch=64 --set world_train.ae_grad_l1=0.5 \
    --set world_train.ae_iterations=$ITS --set world_train.ae_max_minutes=$B_MIN
tar -cf "$OUT/ae_continued.tar" -C /tmp/wt-b generator.safetensors generator.json \
    e4e.safetensors e4e.json metrics.json 2>>"$LOG"
echo "=== done" | tee -a "$LOG"
