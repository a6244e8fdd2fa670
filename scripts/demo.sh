#!/usr/bin/env bash
# `make demo`: shard a real data set on first use, then train on 4 MPI ranks with D-GraB example
# ordering and RegTop-k gradient sparsification at 1 % density; leaves runs/demo/metrics.jsonl and
# runs/demo/curves.png (python -m hpc_dgrab.plot).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NP=${NP:-4}
EPOCHS=${EPOCHS:-3}
OUT=runs/demo
if [ -d /usr/share/datasets/fashion-mnist ]; then SOURCE=fashion-mnist; MODEL=cnn; else SOURCE=digits; MODEL=cnn; fi
DATA=runs/data/$SOURCE-$NP
if [ ! -f "$DATA/manifest.json" ]; then
  echo "[demo] sharding $SOURCE into $NP shards: $DATA"
  "$PY" -m hpc_dgrab.data shard "$SOURCE" --out "$DATA" --shards "$NP" --partition iid --seed 0
fi
rm -rf "$OUT"
echo "[demo] training $MODEL on $SOURCE, $NP ranks: synchronous SGD, --order dgrab, --compress regtopk --density 0.01"
launch/local -n "$NP" -- "$PY" -m hpc_dgrab.train --data "$DATA" --model "$MODEL" --epochs "$EPOCHS" \
  --lr 0.05 --momentum 0.9 --batch-size 32 --seed 0 --sync allreduce \
  --order dgrab --compress regtopk --density 0.01 \
  --metrics "$OUT/metrics.jsonl" --checkpoint-dir "$OUT/ckpt"
"$PY" -m hpc_dgrab.plot "$OUT/metrics.jsonl" -o "$OUT/curves.png"
echo "[demo] per-epoch metrics: $OUT/metrics.jsonl; curves: $OUT/curves.png"
