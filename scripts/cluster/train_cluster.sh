#!/bin/bash
# Training in the emulated cluster: scripts/train.py (ringreduce, one compression per run)
# against torch DDP over gloo on the same links, in the same job (--compare-ddp).
#   scripts/cluster/train_cluster.sh OUTDIR LAYOUT [COMPRESSION ...]     LAYOUT: KxM@RATE
#   STEPS=30 BATCH=8 scripts/cluster/train_cluster.sh /tmp/rrt 2x1@1gbit none int8 onebit
#   EXTRA="--compression-warmup 8 --freeze-variance" TAG=recipe ... onebit   (more train.py flags)
# gloo binds to the node's interface (GLOO_SOCKET_IFNAME, set by netns_ssh.sh) and meets
# at node 0's address (MASTER_ADDR, set by cluster.py). With RR_BENCH_LOCK=FILE set, every
# run holds that lock (flock), so benchmarks on a shared machine do not overlap.
# Each run also writes OUTDIR/NAME.losses.json (loss per step, DDP's, auto's choices).
# Links: tbf rate limit only, no added delay (no netem on this kernel).
set -u
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:?usage: train_cluster.sh OUTDIR KxM@RATE [COMPRESSION ...]}; lay=${2:?layout}; shift 2
comps=${*:-none int8 onebit}
STEPS=${STEPS:-30} BATCH=${BATCH:-8} MODEL=${MODEL:-large} LIMIT=${LIMIT:-540} EXTRA=${EXTRA:-} TAG=${TAG:-}
km=${lay%@*}; rate=${lay#*@}; k=${km%x*}; m=${km#*x}
mkdir -p "$out"
for c in $comps; do
    name="${km}_${rate}_${MODEL}_b${BATCH}_s${STEPS}_${c}${TAG:+_$TAG}"
    echo "== $name" >&2
    ${RR_BENCH_LOCK:+flock "$RR_BENCH_LOCK"} "$here/cluster.sh" run --nodes "$k" --ranks-per-node "$m" \
        --rate "$rate" --timeout "$LIMIT" --json "$out/$name.links.json" -- \
        python "$here/../train.py" --model-size "$MODEL" --steps "$STEPS" --batch-size "$BATCH" \
        --compression "$c" --compare-ddp --eval-batches 4 --no-progress --save-losses "$out/$name.losses.json" $EXTRA \
        > "$out/$name.log" 2>&1
    echo "   rc=$? $(grep -E '^(final loss|samples/s|ddp final loss|ddp samples/s|throughput|after warm-up)' \
        "$out/$name.log" | tr '\n' ';')" >&2
done
