#!/usr/bin/env bash
# The prepared GPU check for one short device lease (plain PyTorch; no Ray, MLflow or workflows).
#
#   benchmarks/gpu_session.sh OMNIGLOT_DIR OUT_DIR
#
# 1. benchmarks/gpu_bench.py: the paper-size network's training step (fp32/bf16 x
#    contiguous/channels_last) and whether one CPU core of pair stage keeps it busy.
# 2. The paper recipe (koch preset, 105 px, 8 distorted copies) trained for PAPER_BUDGET_S
#    seconds, scored on validation and the 400 test trials.
# 3. A sweep of CPU-demo recipe variants at fixed epoch counts, each given the epochs its
#    CPU cost allows in the demo's 480 s budget (epochs = 51 x its pairs/s relative to
#    cpu-small on 2 cores, from bench_model_presets.py). The GPU only makes the comparison
#    fast; selection is on the 1,600 validation trials, never on test.
#
# PARTS=bench,paper,sweep (default) picks the parts; SWEEP=sgd (default: the variants below)
# or SWEEP=adam (optim.algorithm=adam variants, and the recipe again with another seed for the noise).
# Knobs for a dry run on a CPU machine: DEVICE=cpu EPOCH_SCALE=0.02 PAPER_BUDGET_S=20 SWEEP_TIMEOUT_S=120
set -u
DATA=${1:?usage: gpu_session.sh OMNIGLOT_DIR OUT_DIR}
OUT_DIR=${2:?usage: gpu_session.sh OMNIGLOT_DIR OUT_DIR}
DEVICE=${DEVICE:-cuda}
EPOCH_SCALE=${EPOCH_SCALE:-1}
PAPER_BUDGET_S=${PAPER_BUDGET_S:-300}
SWEEP_TIMEOUT_S=${SWEEP_TIMEOUT_S:-340}
PY=${PYTHON:-python3}
PARTS=${PARTS:-bench,paper,sweep}
SWEEP=${SWEEP:-sgd}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d)
CACHE="$WORK/cache"

echo "== $(date -u +%T) machine"
{ nvidia-smi -L 2>/dev/null || true; nproc; $PY -c "import torch; print('torch', torch.__version__)"; } 2>&1

if [[ $PARTS == *bench* ]]; then
  echo "== $(date -u +%T) gpu_bench"
  if [ "$DEVICE" = cuda ]; then BENCH_ARGS=(); else BENCH_ARGS=(--quick); fi
  timeout 200 $PY benchmarks/gpu_bench.py --device "$DEVICE" --source "$DATA" "${BENCH_ARGS[@]}" \
      --json "$OUT_DIR/gpu_bench.json" 2>&1 | tee "$OUT_DIR/gpu_bench.log"
fi

echo "== $(date -u +%T) decode the splits once (35 px, 48 px)"
for size in 35 48; do
  $PY - "$DATA" "$CACHE" "$size" <<'EOF' &
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from cpu_demo_search import load
for split in ("train", "validation"):
    load(Path(sys.argv[1]), split, int(sys.argv[3]), Path(sys.argv[2]))
EOF
done
wait

epochs() { $PY -c "print(max(1, round($1 * $EPOCH_SCALE)))"; }
COMMON=(--device "$DEVICE" --source "$DATA" --cache-dir "$CACHE")
FIXED="training.time_budget_s=100000 training.patience=1000 training.threads=1"
BN="model.batch_norm=true"
C24="model.channels=24,48,48,96 model.embedding_dim=384"
S48="model.input_size=48 model.kernels=5,4,3,2"
# tag | epochs at the demo's CPU budget | overrides
VARIANTS=(
  "base|51|"
  "base-decay0.97|51|optim.lr_decay=0.97"
  "base-bs64-lr0.12|54|training.batch_size=64 optim.lr=0.12"
  "bn-lr0.06|32|$BN"
  "bn-lr0.12|32|$BN optim.lr=0.12"
  "bn-lr0.25|32|$BN optim.lr=0.25"
  "bn-lr0.12-decay0.9|32|$BN optim.lr=0.12 optim.lr_decay=0.9"
  "bn-lr0.12-mom0.9|32|$BN optim.lr=0.12 optim.momentum=0.9"
  "bn-bs64-lr0.12|38|$BN training.batch_size=64 optim.lr=0.12"
  "c24bn-lr0.12|22|$BN $C24 optim.lr=0.12"
  "s48bn-lr0.12|22|$BN $S48 optim.lr=0.12"
)
ADAM="optim.algorithm=adam"
ONE="optim.lr_multipliers.fc=1 optim.lr_multipliers.head=1"
ADAM_VARIANTS=(
  "base-seed1|51|training.seed=1"
  "adam-lr3e-4|51|$ADAM optim.lr=0.0003"
  "adam-lr5e-4|51|$ADAM optim.lr=0.0005"
  "adam-lr1e-3|51|$ADAM optim.lr=0.001"
  "adam-lr2e-3|51|$ADAM optim.lr=0.002"
  "adam-lr1e-3-x1|51|$ADAM optim.lr=0.001 $ONE"
  "adam-lr1e-3-decay0.9|51|$ADAM optim.lr=0.001 optim.lr_decay=0.9"
  "adam-lr1e-3-wd0|51|$ADAM optim.lr=0.001 optim.weight_decay=0"
  "adam-bn-lr1e-3|32|$ADAM $BN optim.lr=0.001"
  "adam-bn-lr3e-3|32|$ADAM $BN optim.lr=0.003"
)
if [ "$SWEEP" = adam ]; then VARIANTS=("${ADAM_VARIANTS[@]}"); fi

echo "== $(date -u +%T) paper recipe for ${PAPER_BUDGET_S}s, and ${#VARIANTS[@]} demo variants, side by side"
if [[ $PARTS == *paper* ]]; then
  timeout $((PAPER_BUDGET_S + 150)) $PY benchmarks/cpu_demo_search.py --recipe paper --device "$DEVICE" \
      --source "$DATA" --test --tag "paper-${PAPER_BUDGET_S}s" --results "$WORK/paper.jsonl" \
      --set training.time_budget_s="$PAPER_BUDGET_S" > "$WORK/paper.log" 2>&1 &
fi
[[ $PARTS == *sweep* ]] || VARIANTS=()
for v in "${VARIANTS[@]}"; do
  IFS='|' read -r tag n extra <<<"$v"
  # shellcheck disable=SC2086
  timeout "$SWEEP_TIMEOUT_S" $PY benchmarks/cpu_demo_search.py "${COMMON[@]}" --tag "$tag" \
      --results "$WORK/sweep-$tag.jsonl" --set $FIXED training.epochs="$(epochs "$n")" $extra \
      > "$WORK/sweep-$tag.log" 2>&1 &
done
wait
echo "== $(date -u +%T) done"

cat "$WORK"/*.jsonl > "$OUT_DIR/results.jsonl" 2>/dev/null
for f in "$WORK"/*.log; do echo "##### $(basename "$f")"; cat "$f"; done > "$OUT_DIR/runs.log"
$PY - "$OUT_DIR/results.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"{'tag':<22} {'epochs':>6} {'best':>4} {'val320':>7} {'val1600':>7} {'test400':>7} {'min':>5}")
for r in sorted(rows, key=lambda r: -r["val_oneshot_1600"]):
    test = r.get("test_oneshot_400")
    print(f"{r['tag']:<22} {r['epochs_run']:>6} {r['best_epoch']:>4} {r['val_oneshot_320']:>7.4f} "
          f"{r['val_oneshot_1600']:>7.4f} {'' if test is None else f'{test:.4f}':>7} {r['train_minutes']:>5.1f}")
EOF
rm -rf "$WORK"
