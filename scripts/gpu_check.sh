#!/usr/bin/env bash
# The local backend's GPU paths, each through the real CLI on this machine's CUDA GPU(s), on the offline tiny model
# and sample data (no hub needed). CPU-only CI cannot run these; run this where a GPU is at hand:
#
#   bash scripts/gpu_check.sh [OUT_DIR]            # checks 1-4, a few minutes
#   FULL_SIZE=1 bash scripts/gpu_check.sh [OUT]    # + check 5 (about 15 GB of disk, 5-10 minutes)
#   CHECKS="lora_bf16 phi3_mini_full_size" FULL_SIZE=1 bash scripts/gpu_check.sh   # only the named checks
#   CHECK_ARGS="finetune.num_train_epochs=1" bash scripts/gpu_check.sh              # extra overrides for each
#
#   1. the defaults (full fine-tuning) in bf16 mixed precision, the whole workflow: train, register, an endpoint
#      that serves from the GPU, the sample request, cleanup
#   2. LoRA in bf16 with the frozen base loaded 16-bit, merged and registered
#   3. LoRA + DeepSpeed ZeRO-2 (finetune=lora_deepspeed2), launched through torchrun, then registered
#   4. full fine-tuning + DeepSpeed ZeRO-3 (finetune=full_deepspeed3), gathered 16-bit weights saved, registered
#   5. the Phi-3-mini architecture at full size (32 layers, hidden 3072, MLP 8192, 32 heads; random init, since no
#      weights can be downloaded here), LoRA bf16 for a few steps: tokens/s and the measured peak GPU memory
#      against the compute step's estimate
# Each run's log, run record and metrics go to OUT_DIR/<check>/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-gpu_check}")
mkdir -p "$out"
export PYTHONUNBUFFERED=1
ftrun() { python -m runner.cli "$@"; }
upto_register="steps=[connect,model,compute,data,finetune,metrics,register]"

check() {  # name, then ftrun arguments; CHECKS="name ..." runs only those
  local name=$1; shift
  [[ -z "${CHECKS:-}" || " $CHECKS " == *" $name "* ]] || return 0
  echo "=== $name: ftrun $*"
  local started=$SECONDS
  # shellcheck disable=SC2086  # CHECK_ARGS: extra overrides for every check, split on spaces
  if ftrun compute=local_gpu hydra.run.dir="$out/$name" "$@" ${CHECK_ARGS:-} 2>&1 | tee "$out/$name.log" | grep -v "it/s]$"; then
    echo "=== $name: passed in $((SECONDS - started)) s"
  else
    echo "=== $name: FAILED after $((SECONDS - started)) s (log: $out/$name.log)"; status=1
  fi
}
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python - <<'EOF'
import torch, transformers, peft
print(f"torch {torch.__version__} cuda {torch.version.cuda} devices {torch.cuda.device_count()} "
      f"bf16 {torch.cuda.is_bf16_supported()}; transformers {transformers.__version__}; peft {peft.__version__}")
try:
    import deepspeed
    print(f"deepspeed {deepspeed.__version__}")
except Exception as exc:  # checks 2 and 3 then fail with the trainer's own message
    print(f"deepspeed unavailable: {exc}")
EOF

check full_bf16 finetune.precision=16
check lora_bf16 finetune=lora finetune.precision=16 "finetune.local.lora_modules_to_save=[]" "$upto_register"
check lora_deepspeed2 finetune=lora_deepspeed2 "$upto_register"
check full_deepspeed3 finetune=full_deepspeed3 finetune.learning_rate=1e-4 "$upto_register"
if [[ "${FULL_SIZE:-0}" == 1 ]]; then
  check phi3_mini_full_size finetune=lora finetune.precision=16 finetune.max_steps=30 finetune.logging_steps=5 \
    finetune.per_device_train_batch_size=4 finetune.max_seq_length=2048 finetune.evaluation_strategy=disable \
    "finetune.local.lora_modules_to_save=[]" model.context_length=4096 \
    model.tiny.hidden_size=3072 model.tiny.intermediate_size=8192 model.tiny.num_hidden_layers=32 \
    model.tiny.num_attention_heads=32 model.tiny.vocab_size=32064 model.tiny.max_position_embeddings=4096 \
    "steps=[connect,model,compute,data,finetune]"
fi
exit $status
