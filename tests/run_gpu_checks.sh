#!/usr/bin/env bash
# Everything a GPU host checks, in one command, in this order: the loader benchmark and the
# bf16 training benchmark, then the GPU tests, then the other GPU benchmarks (hardware-decoder
# loads, fp32/fp16, NCHW, torch.compile). Each step has a time limit, so a slow step cannot
# starve the others.
#   bash tests/run_gpu_checks.sh OUT_DIR
# Writes OUT_DIR/gpu.txt, gpu_tests.log and bench_*.json; the figures go into
# docs/BENCHMARKS.md with the card's name from gpu.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash tests/run_gpu_checks.sh OUT_DIR}
mkdir -p "$out"
nvidia-smi -L | tee "$out/gpu.txt"
carbrand=(python3 -m carbrand.cli)  # an array, not a function: `timeout` runs programs
step() { local limit=$1; shift; echo "== $(date +%T) $*"; timeout "$limit" "$@"; echo "== exit $?"; }

shared_data=${CARBRAND_TEST_DATA:-../shared/data}  # the real test photos, found as tests/helpers/paths.py finds them
prepared=data/cars5/prepared  # the cars5 photos; realistic sets are re-encoded from them
[ -f "$prepared/manifest.json" ] || "${carbrand[@]}" prepare "$shared_data/cars5" --out "$prepared"
# Loaders: photos re-encoded at 500x375 and 1024x768, 32 copies (8,512 train images, Stanford Cars' size)
step 150 "${carbrand[@]}" bench data --manifest "$prepared" --photo-size 1024x768 --photo-size 500x375 --copies 32 \
  --workers 16 --batch-size 256 --batches 20 --warmup-batches 5 --out "$out/bench_data.json"
set_1024=runs/bench/cars5-1024x768-x32
# ResNet-50 at 224, batch 256, bf16, channels-last: DALI-gpu loader vs in-memory batch vs bare loop
recipe=(--config configs/stanford_cars.yaml "data.manifest=$set_1024" data.batch_size=256 data.workers=16)
step 150 "${carbrand[@]}" bench train "${recipe[@]}" --precisions bf16 --out "$out/bench_train_bf16.json"
# The GPU tests (after the two headline benchmarks above)
step 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_loaders.py > "$out/gpu_tests.log" 2>&1; tail -5 "$out/gpu_tests.log"
for load in 0 0.99; do
  step 60 "${carbrand[@]}" bench data --manifest "$set_1024" --backends dali-gpu --pipelines train --workers 16 \
    --batch-size 256 --batches 20 --warmup-batches 5 --hw-decoder-load $load --out "$out/bench_hw_decoder_$load.json"
done
step 150 "${carbrand[@]}" bench train "${recipe[@]}" --precisions no,fp16 --measure memory,bare --out "$out/bench_train_precisions.json"
step 60 "${carbrand[@]}" bench train "${recipe[@]}" --channels-last off --measure memory --out "$out/bench_train_nchw.json"
step 300 "${carbrand[@]}" bench train "${recipe[@]}" --compile on --measure memory,bare --out "$out/bench_train_compile.json"
