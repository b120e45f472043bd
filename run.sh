#!/usr/bin/env bash
# The whole loop on the bundled data: set up, prepare, fine-tune, export, evaluate base against fine-tuned.
# On a CUDA GPU it fine-tunes Mistral-7B-Instruct-v0.3 in 4-bit through Unsloth; without one it says so and runs
# the same loop on SmolLM2-135M-Instruct, a real instruction-tuned model small enough for a CPU.
#   bash run.sh                      everything with the defaults
#   DATA=my.jsonl bash run.sh        your own data
#   CONFIG=configs/t4.yaml bash run.sh   a GPU profile (see configs/)
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
PY=${VENV:-.venv}/bin/python
DATA=${DATA:-data/howto_steps.jsonl}
OUT=${OUT:-runs}

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  MODEL=${MODEL:-mistral}
  CONFIG=${CONFIG:-configs/t4.yaml}
  EVAL_FLAGS=()
  QUANT=q4_k_m
else
  echo "No CUDA GPU found: running the CPU loop on SmolLM2-135M-Instruct (--model smollm2), 8 to 20 minutes on 2 cores."
  MODEL=${MODEL:-smollm2}
  CONFIG=${CONFIG:-configs/cpu.yaml}
  EVAL_FLAGS=(--bertscore-model minilm)
  QUANT=q8_0
fi
RUN="$OUT/$MODEL"
if [ -d "$RUN/checkpoints" ]; then
  echo "$RUN holds an earlier run: keep it and write this one elsewhere (OUT=runs-2 bash run.sh), or remove it (rm -r $RUN)." >&2
  exit 1
fi

"$PY" prepare_data.py "$DATA" --out "$OUT/data" --model "$MODEL" --config "$CONFIG"
"$PY" finetune.py --data "$OUT/data" --out "$RUN" --model "$MODEL" --config "$CONFIG" --export gguf --quant "$QUANT"
# Base against the adapter, the exported GGUF against the adapter (parity), and the forgetting probe.
"$PY" evaluate.py --data "$OUT/data" --finetuned "$RUN" --out "$RUN/eval" --config "$CONFIG" "${EVAL_FLAGS[@]}"

echo
echo "Report:  $RUN/eval/report.md  (and report.html)"
echo "GGUF:    $RUN/gguf/  with an Ollama Modelfile:  ollama create howto-steps -f $RUN/gguf/Modelfile"
