#!/usr/bin/env bash
# `make demo`: shard a real data set on first use, then train on 4 MPI ranks and print each epoch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NP=${NP:-4}
EPOCHS=${EPOCHS:-3}
if [ -d /usr/share/datasets/fashion-mnist ]; then SOURCE=fashion-mnist; MODEL=cnn; else SOURCE=digits; MODEL=cnn; fi
DATA=runs/data/$SOURCE-$NP
if [ ! -f "$DATA/manifest.json" ]; then
  echo "[demo] sharding $SOURCE into $NP shards: $DATA"
  "$PY" -m hpc_dgrab.data shard "$SOURCE" --out "$DATA" --shards "$NP" --partition iid --seed 0
fi
echo "[demo] training $MODEL on $SOURCE, $NP ranks, synchronous SGD over MPI all-reduce"
launch/local -n "$NP" -- "$PY" -m hpc_dgrab.train --data "$DATA" --model "$MODEL" --epochs "$EPOCHS" \
  --lr 0.05 --momentum 0.9 --batch-size 32 --seed 0 --sync allreduce \
  --metrics runs/demo/metrics.jsonl --checkpoint-dir runs/demo/ckpt
echo "[demo] per-epoch metrics: runs/demo/metrics.jsonl"
