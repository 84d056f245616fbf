#!/usr/bin/env bash
# The GPU figures of issue 15 in one call of the `device` tool (run by hand on a lent GPU; CI never runs it):
#   1. KD steps of a Llama-3.2-1B student (full fine-tuning) with a Llama-3.1-8B-shaped teacher, bf16, random weights:
#      tokens/s, MFU (FLOPs counted on the step; measured bf16 matmul peak and the 989 TFLOP/s H100/H200 datasheet
#      figure) and peak memory; then the KD loss alone at V = 128,256 and 4,096 positions, unchunked vs kdtune's
#      memory-budget chunks (torch.cuda.max_memory_allocated above the baseline).
#   2. The same pair with a LoRA r8 student (torchtune's KD setting) and `compile: true` (each decoder layer and the
#      chunk loss), and the KD loss alone again with the compiled chunk loss.
#   3. `kdtune estimate --calibrate` on the tiny KD and LoRA configs on CUDA: the estimate next to
#      torch.cuda.max_memory_allocated of real steps.
# Time limits per part (200 + 240 + 2 x 50 s) keep the whole call inside one 600 s device command.
#
# The device image has torch but not omegaconf or datasets: their wheels travel in the ignored folder .whl/. Once,
# here, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
#       omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 datasets==5.2.0 dill multiprocess
# then one `run` with carry [".whl"] and timeout_s 600: `bash benchmarks/gpu_check.sh`. Everything lands in $OUT
# (log.txt and one JSON per part). Sizes can be overridden for a dry run elsewhere, e.g. on a CPU:
#   KD_DEVICE=cpu KD_DTYPE=fp32 BATCH=1 SEQ=32 STEPS=1 LOSS_TOKENS=64 \
#   STUDENT=kdtune.models.qwen2.qwen2_0_5b TEACHER=kdtune.models.qwen2.qwen2_0_5b bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/kdtune-gpu-check}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
DEVICE=${KD_DEVICE:-cuda}
DTYPE=${KD_DTYPE:-bf16}
STUDENT=${STUDENT:-kdtune.models.llama3_2.llama3_2_1b}
TEACHER=${TEACHER:-kdtune.models.llama3_1.llama3_1_8b}
BATCH=${BATCH:-4}
SEQ=${SEQ:-2048}
STEPS=${STEPS:-8}
LOSS_TOKENS=${LOSS_TOKENS:-4096}
LOG="$OUT/log.txt"
: >"$LOG"
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } >>"$LOG"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"

kd() {  # kd_throughput.py with the pair and the shared settings; $1 = JSON name, $2 = time limit (s), then extras
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 benchmarks/kd_throughput.py --device "$DEVICE" --dtype "$DTYPE" --student-model "$STUDENT" \
    --teacher-model "$TEACHER" --batch-size "$BATCH" --seq-len "$SEQ" --steps "$STEPS" --mfu --peak-tflops 989 \
    --num-output-chunks 0 --json "$OUT/$name.json" "$@" 2>&1 | tee -a "$LOG"
}

echo "== 1. full fine-tuning student, eager; the KD loss alone at V = 128,256" | tee -a "$LOG"
kd kd_full 200 --warmup-steps 2 --loss-vocab 128256 --loss-tokens "$LOSS_TOKENS" --loss-hidden 2048 \
  || echo "part 1 failed (exit $?)" | tee -a "$LOG"

echo "== 2. LoRA r8 student, compile: true" | tee -a "$LOG"
kd kd_lora_compiled 240 --lora-rank 8 --compile --warmup-steps 3 --loss-vocab 128256 --loss-tokens "$LOSS_TOKENS" \
  --loss-hidden 2048 || echo "part 2 failed (exit $?)" | tee -a "$LOG"

echo "== 3. kdtune estimate vs the measured peak, tiny configs" | tee -a "$LOG"
TINY=/tmp/kdtune-tiny-gpu
python3 -m kdtune make-tiny --dir "$TINY" >>"$LOG" 2>&1 || echo "make-tiny failed" | tee -a "$LOG"
for kind in kd lora; do
  over=("checkpointer.checkpoint_dir=$TINY/student" "dataset.data_files=$TINY/train.jsonl" "output_dir=/tmp/kdtune-est-$kind")
  [ "$kind" = kd ] && over+=("teacher_checkpointer.checkpoint_dir=$TINY/teacher")
  echo "-- tiny/$kind" | tee -a "$LOG"
  timeout 50 python3 -m kdtune estimate --config "tiny/$kind" "${over[@]}" "device=$DEVICE" "dtype=$DTYPE" \
    --calibrate 3 2>&1 | tee -a "$LOG" | tee "$OUT/estimate_$kind.txt"
done
echo "== done" | tee -a "$LOG"
