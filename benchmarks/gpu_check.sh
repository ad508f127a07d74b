#!/usr/bin/env bash
# The bf16 / NCCL GPU path, checked in under 5 minutes on one GPU (each step has its own time limit):
#
#   bash benchmarks/gpu_check.sh                # on a machine with a CUDA GPU; results in ${OUT:-/tmp/gpu_check}
#   bash benchmarks/gpu_check.sh --dry-run      # the same steps on CPU, tiny preset (DEVICE=cpu): 4-8 min on 2 cores
#
# Steps (a failed step is reported with the end of its log; the others still run; exit 1 if any failed):
#   env      torch / CUDA / DeepSpeed / Ray versions and the GPU                              -> env.log
#   prefill  llava-1.5-7b random weights built on the GPU in bf16 (no fp32 copy on the CPU), prefill of
#            8 x (576 visual + 64 text) tokens at compression 1 (dense), 2, 4 and auto: time ratio vs the
#            analytic FLOPs ratio (dpn_model/flops.py)                                      -> prefill.log, prefill.json
#   train    two optimizer steps of the training job (`python -m jobs.train`, configs/train_tiny.yaml) on one GPU
#            worker: DeepSpeed ZeRO-2, deepspeed.precision=bf16, NCCL; synthetic data generated on first use
#                                                                                            -> train.log, train/
#   serve    the Ray Serve app (serve_apps.app:build_app) with device cuda, dtype bfloat16, serving the model
#            step `train` wrote (preset:tiny if it failed), answers one image question over HTTP -> serve.log, serve.json
# --dry-run adds `build7b`: the 7B model built on the meta device (shapes, dtype, parameter count, analytic FLOPs).
#
# Needs the project installed (`pip install -e .[test]`, a CUDA build of torch on the GPU machine); no network.
# Settings (environment): OUT, DEVICE (cuda | cpu), PRESET, BATCH, REPEATS, PYTHON,
#   PREFILL_TIMEOUT, TRAIN_TIMEOUT, SERVE_TIMEOUT (seconds; defaults 100, 130, 70 on GPU, 3x that on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

OUT="${OUT:-/tmp/gpu_check}"
PYTHON="${PYTHON:-python}"
if [ "$DRY_RUN" = 1 ]; then
  DEVICE="${DEVICE:-cpu}"; PRESET="${PRESET:-tiny}"; BATCH="${BATCH:-2}"; REPEATS="${REPEATS:-2}"; SLOW=3
else
  DEVICE="${DEVICE:-cuda}"; PRESET="${PRESET:-llava-1.5-7b}"; BATCH="${BATCH:-8}"; REPEATS="${REPEATS:-5}"; SLOW=1
fi
PREFILL_TIMEOUT="${PREFILL_TIMEOUT:-$((100 * SLOW))}"
TRAIN_TIMEOUT="${TRAIN_TIMEOUT:-$((130 * SLOW))}"
SERVE_TIMEOUT="${SERVE_TIMEOUT:-$((70 * SLOW))}"
if [ "$DEVICE" = cpu ]; then USE_GPU=false; else USE_GPU=true; fi

mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export RAY_USAGE_STATS_ENABLED=0
FAILED=()
START=$SECONDS

# run_step NAME LIMIT_S SHOW_REGEX COMMAND...: run COMMAND under `timeout`, its output to $OUT/NAME.log; print the
# lines matching SHOW_REGEX (or the end of the log on failure).
run_step() {
  local name=$1 limit=$2 show=$3
  shift 3
  local log="$OUT/$name.log" begin=$SECONDS rc=0
  echo "== $name (limit ${limit} s)"
  timeout --kill-after=15 "$limit" "$@" >"$log" 2>&1 || rc=$?
  if [ "$rc" = 0 ]; then
    grep -E "$show" "$log" | sed 's/^/   /' || true
    echo "== $name: ok in $((SECONDS - begin)) s (log $log)"
  else
    [ "$rc" = 124 ] && echo "== $name: TIMED OUT after ${limit} s"
    echo "== $name: FAILED (exit $rc) after $((SECONDS - begin)) s; end of $log:"
    tail -n 40 "$log" | sed 's/^/   /'
    FAILED+=("$name")
  fi
}

echo "gpu_check: device $DEVICE, preset $PRESET, batch $BATCH, out $OUT$([ "$DRY_RUN" = 1 ] && echo ', dry run')"

run_step env 60 '.' "$PYTHON" -c '
import torch, deepspeed, ray, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("deepspeed", deepspeed.__version__, "ray", ray.__version__, "transformers", transformers.__version__)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported(),
          "nccl", torch.distributed.is_nccl_available(), torch.cuda.nccl.version())
'

if [ "$DRY_RUN" = 1 ]; then
  run_step build7b 120 'gpu_check' "$PYTHON" benchmarks/gpu_check.py prefill --preset llava-1.5-7b --device meta \
    --dtype bfloat16 --batch 8 --out "$OUT"
fi

run_step prefill "$PREFILL_TIMEOUT" '^\||gpu_check|^prefill|peak|auto expert' \
  "$PYTHON" benchmarks/gpu_check.py prefill --preset "$PRESET" --device "$DEVICE" --dtype bfloat16 \
  --batch "$BATCH" --repeats "$REPEATS" --out "$OUT"

TRAIN="$OUT/train"
rm -rf "$TRAIN"
run_step train "$TRAIN_TIMEOUT" 'step [0-9]+/|^steps=|^model_dir=|^run_id=' \
  "$PYTHON" -m jobs.train --config configs/train_tiny.yaml \
  run.name=gpu-check run.work_dir="$TRAIN/work" run.storage_path="$TRAIN/runs" run.num_workers=1 \
  run.use_gpu="$USE_GPU" run.cpus_per_worker=1 run.local_num_cpus=4 run.max_failures=0 \
  deepspeed.config=zero2.json deepspeed.precision=bf16 \
  model.dense_warmup_steps=0 train.max_steps=2 train.micro_batch_size=4 train.log_every=1 \
  data.synthetic.num_train=32 data.synthetic.num_eval=8 checkpoint.every_steps=2 \
  mlflow.tracking_uri="sqlite:///$TRAIN/mlflow.db" mlflow.experiment=gpu-check mlflow.registered_model=dpn-gpu-check
MODEL="preset:tiny"
if [[ ! " ${FAILED[*]} " =~ " train " ]]; then
  steps=$(sed -n 's/^steps=//p' "$OUT/train.log" | tail -n 1)
  model_dir=$(sed -n 's/^model_dir=//p' "$OUT/train.log" | tail -n 1)
  if [ "$steps" != 2 ]; then
    echo "== train: FAILED: the job reported steps=${steps:-?}, expected 2"
    FAILED+=("train")
  elif [ -n "$model_dir" ] && [ -f "$model_dir/config.json" ]; then
    MODEL="$model_dir"
    # the saved weights are the engine's: all bf16 when DeepSpeed really trained in bf16
    if dtypes=$("$PYTHON" -c '
import glob, sys
from safetensors import safe_open
found = set()
for path in glob.glob(sys.argv[1] + "/*.safetensors"):
    with safe_open(path, "pt") as f:
        found |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}
print(" ".join(sorted(found)))
' "$model_dir" 2>>"$OUT/train.log") && [ "$dtypes" = BF16 ]; then
      echo "   trained checkpoint weights: $dtypes ($model_dir)"
    else
      echo "== train: FAILED: the trained checkpoint's weights are '${dtypes:-?}', expected BF16"
      FAILED+=("train")
    fi
  fi
fi

run_step serve "$SERVE_TIMEOUT" '^HTTP|^answer|^finish_reason|replica:|deployed' \
  "$PYTHON" benchmarks/gpu_check.py serve --model "$MODEL" --device "$DEVICE" --dtype bfloat16 --out "$OUT"

echo "gpu_check: $((SECONDS - START)) s in all; logs and results in $OUT"
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "gpu_check: FAILED: ${FAILED[*]}"
  exit 1
fi
echo "gpu_check: all steps passed"
