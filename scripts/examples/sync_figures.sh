#!/bin/sh
# The LocalSGD / DiLoCo figures of docs/torch.md: np=2, tiny preset, 400 steps, one run at a time.
#   sh scripts/examples/sync_figures.sh [OUTDIR] [SEED]
# Writes OUTDIR/*.json and *.log, then the table (OUTDIR/table.md) and docs/img/sync_tiny_np2.png.
set -e
OUT=${1:-runs/sync}
SEED=${2:-0}
mkdir -p "$OUT"
NP=${NP:-2}
run() {   # run NAME ARGS...
    name=$1; shift
    mpirun -np "$NP" python scripts/train.py --no-progress --seed "$SEED" --save-losses "$OUT/$name.json" "$@" \
        > "$OUT/$name.log" 2>&1
    echo "$name: $(grep -E '^final loss' "$OUT/$name.log"), $(grep -E '^wire MiB' "$OUT/$name.log")"
}
OUTER="--outer-lr 0.7 --outer-momentum 0.5"
run step --sync step
run step_int8 --sync step --compression int8
for H in 4 8 16 32; do
    run localsgd_h$H --sync local-sgd --sync-every $H
    for C in none int8 int4; do
        run diloco_h${H}_$C --sync diloco --sync-every $H $OUTER --compression $C
    done
done
run diloco_h8_none_mom0.9 --sync diloco --sync-every 8     # the API's default outer (0.7, Nesterov 0.9)
run diloco_h8_int4_f4_overlap --sync diloco --sync-every 8 $OUTER --compression int4 --fragments 4 --overlap-sync
python scripts/plot_sync.py "$OUT"/*.json --table > "$OUT/table.md"
cat "$OUT/table.md"
python scripts/plot_sync.py "$OUT"/*.json --out "${PNG:-docs/img/sync_tiny_np2.png}" \
    --title "train.py --model-size tiny --steps 400, np=2 (seed $SEED): per-step sync vs LocalSGD vs DiLoCo" \
    --only step localsgd_h8 diloco_h4_int8 diloco_h8_int8 diloco_h8_int4 diloco_h16_int8 diloco_h32_int8 \
           diloco_h8_none_mom0.9 diloco_h8_int4_f4_overlap
