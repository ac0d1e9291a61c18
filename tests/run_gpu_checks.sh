#!/usr/bin/env bash
# Everything a GPU host checks, in one command, most lacking first: the GPU tests (the newest
# GPU paths: shards, a timm backbone, precision auto, eval crops), the loader benchmark, the bf16 training
# benchmark and training with GPU TrivialAugment, then the other GPU benchmarks (fp16 and
# compiled TrivialAugment, hardware-decoder loads, epoch boundaries, fp32/fp16, NCHW,
# torch.compile, EfficientNet-Lite0). A lease of about 10 minutes gets through the training
# benchmarks; each step has a time limit, so a slow step cannot starve the others, and each
# writes its own file, so what ran is kept when the lease ends the script part way.
#   bash tests/run_gpu_checks.sh OUT_DIR [NAME ...]
# NAMEs pick steps (default: all); they run in this order: tests loaders bf16 trivial trivial-hw-decoder
# trivial-compiled efficientnet precisions nchw hw-decoder epochs trivial-fp16 compile loaders-all.
# A short lease names only the ones docs/BENCHMARKS.md still lacks.
# Writes OUT_DIR/gpu.txt, gpu_tests.log and bench_*.json; the figures go into
# docs/BENCHMARKS.md with the card's name from gpu.txt. Exits non-zero when anything failed: a step
# that fails lets the later steps run, then the script ends with the list of failed steps and exit 1.
# (`pytest -m gpu` fails, not skips, a gpu test on a host without CUDA: tests/conftest.py.)
set -euo pipefail
carbrand=(python3 -m carbrand.cli)  # an array, not a function: `timeout` runs programs
steps_started=0
failed_steps=()
wanted_steps=()

# One step under its time limit; then nothing it started may live on (a leftover trainer holds the
# GPU while the next step measures). At the limit `timeout` sends SIGTERM to the step's process
# group (the bench then ends its workers) and SIGKILL 15 s later if the step is still there; after
# the step, end_leftovers kills whatever it started that is left, found by a variable in its
# environment, so even a process in a session of its own.
step() {
  local limit=$1 tag="$$-$((++steps_started))"; shift
  echo "== $(date +%T) $*"
  local status=0
  CARBRAND_GPU_CHECK_STEP=$tag timeout -k 15 "$limit" "$@" || status=$?
  end_leftovers "$tag"
  echo "== exit $status"
  (( status == 0 )) || failed_steps+=("$* (exit $status)")
}
# Whether the caller asked for the step NAME (no names asked: every step).
wanted() {
  (( ${#wanted_steps[@]} == 0 )) && return 0
  local name
  for name in "${wanted_steps[@]}"; do [[ $name == "$1" ]] && return 0; done
  return 1
}
# At the end: exit 1, naming them, if any step failed.
report_failed_steps() {
  (( ${#failed_steps[@]} == 0 )) && return 0
  echo "tests/run_gpu_checks.sh: ${#failed_steps[@]} step(s) failed:" >&2
  printf '  %s\n' "${failed_steps[@]}" >&2
  exit 1
}
end_leftovers() {
  local pids=() environ
  for environ in /proc/[0-9]*/environ; do
    grep -qzx "CARBRAND_GPU_CHECK_STEP=$1" "$environ" 2>/dev/null && pids+=("${environ//[^0-9]/}")
  done
  if (( ${#pids[@]} )); then
    echo "== killing ${#pids[@]} process(es) the step left behind: ${pids[*]}"
    kill -KILL "${pids[@]}" 2>/dev/null || true  # some may have ended meanwhile
  fi
  return 0
}
# A GPU host often runs a bare checkout (no `pip install -e .`): the trainer the GPU tests start as a script
# (python carbrand/train.py) must still import carbrand, so every process gets the checkout on its path.
export PYTHONPATH="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0  # sourced (tests/test_bench.py checks `step`): the helpers only

cd "$(dirname "$0")/.."
cd "$(dirname "$0")/.."
out=${1:?usage: bash tests/run_gpu_checks.sh OUT_DIR [NAME ...]}
wanted_steps=("${@:2}")
known_steps=" tests loaders bf16 trivial trivial-hw-decoder trivial-compiled efficientnet precisions nchw hw-decoder epochs trivial-fp16 compile loaders-all "
for name in "${wanted_steps[@]}"; do
  [[ $known_steps == *" $name "* ]] || { echo "tests/run_gpu_checks.sh: no step named '$name' (steps:$known_steps)" >&2; exit 2; }
done
mkdir -p "$out"
# without a GPU every step would train ResNet-50 on the CPU until its time limit, measuring nothing
nvidia-smi -L | tee "$out/gpu.txt" || { echo "tests/run_gpu_checks.sh: no GPU here (nvidia-smi -L failed)" >&2; exit 1; }

shared_data=${CARBRAND_TEST_DATA:-../shared/data}  # the real test photos, found as tests/helpers/paths.py finds them
prepared=data/cars5/prepared  # the cars5 photos; realistic sets are re-encoded from them
[ -f "$prepared/manifest.json" ] || "${carbrand[@]}" prepare "$shared_data/cars5" --out "$prepared"
# Photos re-encoded at 1024x768, 32 copies (8,512 train images, Stanford Cars' size): the first step
# that reads them makes them
set_1024=runs/bench/cars5-1024x768-x32
python3 -c "import sys; from pathlib import Path; from carbrand.bench.photo_set import build_photo_set
build_photo_set(Path(sys.argv[1]), Path(sys.argv[2]), (1024, 768), 32)" "$prepared" "$set_1024"
# ResNet-50 at 224, batch 256, channels-last, on that set
recipe=(--config configs/stanford_cars.yaml "data.manifest=$set_1024" data.batch_size=256 data.workers=16)

# The GPU tests first: correctness before speed
wanted tests && { step 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_loaders.py \
  tests/test_shards.py > "$out/gpu_tests.log" 2>&1; tail -5 "$out/gpu_tests.log"; }
# Loaders: DALI GPU decode (the 16-core figures of DALI CPU decode and torchvision: loaders-all)
wanted loaders && step 90 "${carbrand[@]}" bench data --manifest "$set_1024" --backends dali-gpu \
  --workers 16 --batch-size 256 --batches 20 --warmup-batches 5 --out "$out/bench_data.json"
# bf16: DALI-gpu loader vs in-memory batch vs bare loop
wanted bf16 && step 150 "${carbrand[@]}" bench train "${recipe[@]}" --precisions bf16 --out "$out/bench_train_bf16.json"
# The augmentation goal: the real loader with GPU TrivialAugment at >= 0.95x the in-memory rate, over 100 steps
# = 3 epochs of the 8,512-image set (so 3 epoch boundaries); bf16 eager here, fp16 and compiled further down
# (overrides first: they are one positional list, options after them)
trivial=(bench train "${recipe[@]}" data.augment=trivial)
over_100_steps=(--measure real,memory --steps 100)
wanted trivial && step 150 "${carbrand[@]}" "${trivial[@]}" "${over_100_steps[@]}" --precisions bf16 --out "$out/bench_train_trivial.json"
# The same with every JPEG on the hardware decoder, so that decoding leaves the SMs to training
wanted trivial-hw-decoder && step 150 "${carbrand[@]}" "${trivial[@]}" data.hw_decoder_load=0.99 "${over_100_steps[@]}" --precisions bf16 \
  --out "$out/bench_train_trivial_hw_decoder.json"
wanted trivial-compiled && step 240 "${carbrand[@]}" "${trivial[@]}" "${over_100_steps[@]}" --precisions bf16 --compile on \
  --out "$out/bench_train_trivial_compiled.json"
# The fine-tuning recipe's backbone (timm EfficientNet-Lite0) at the same batch, precision auto
wanted efficientnet && step 150 "${carbrand[@]}" bench train "${recipe[@]}" model.arch=tf_efficientnet_lite0 \
  model.pretrained=none --out "$out/bench_train_efficientnet_lite0.json"
wanted precisions && step 150 "${carbrand[@]}" bench train "${recipe[@]}" --precisions no,fp16 --measure memory,bare \
  --out "$out/bench_train_precisions.json"
wanted nchw && step 60 "${carbrand[@]}" bench train "${recipe[@]}" --channels-last off --measure memory \
  --out "$out/bench_train_nchw.json"
for load in 0 0.99; do
  wanted hw-decoder && step 60 "${carbrand[@]}" bench data --manifest "$set_1024" --backends dali-gpu --pipelines train \
    --workers 16 --batch-size 256 --batches 20 --warmup-batches 5 --hw-decoder-load $load --out "$out/bench_hw_decoder_$load.json"
done
# Epoch boundaries and what GPU augmentation costs: every batch of 3 epochs timed, augment none / trivial
for augment in none trivial; do
  wanted epochs && step 90 "${carbrand[@]}" bench data --manifest "$set_1024" --backends dali-gpu --epochs 3 \
    --augment $augment --workers 16 --batch-size 256 --out "$out/bench_epochs_$augment.json"
done
wanted trivial-fp16 && step 360 "${carbrand[@]}" "${trivial[@]}" "${over_100_steps[@]}" --precisions fp16 --compile off,on \
  --out "$out/bench_train_trivial_fp16.json"
wanted compile && step 300 "${carbrand[@]}" bench train "${recipe[@]}" --compile on --measure memory,bare \
  --out "$out/bench_train_compile.json"
# Every loader at both photo sizes (DALI CPU decode and torchvision on this host's cores)
wanted loaders-all && step 150 "${carbrand[@]}" bench data --manifest "$prepared" --photo-size 1024x768 \
  --photo-size 500x375 --copies 32 --workers 16 --batch-size 256 --batches 20 --warmup-batches 5 \
  --out "$out/bench_data_all.json"
report_failed_steps
