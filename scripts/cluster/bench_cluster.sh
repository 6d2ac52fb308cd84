#!/bin/bash
# Allreduce sweeps inside the emulated cluster (docs/cluster.md, "Benchmarks").
#   scripts/cluster/bench_cluster.sh OUTDIR [LAYOUT ...]     LAYOUT: KxM@RATE, e.g. 2x1@1gbit
# For each layout: one full sweep (4 KiB..64 MiB; native default, ring, tree, hierarchical,
# int8/int4/onebit, plus hier+int8/hier+onebit when M > 1), then one 64 MiB run per forced
# native algorithm (coll_tuned_allreduce_algorithm N), each with ring/int8/onebit
# interleaved as the same-run reference. EXTRA_COLS (default: auto and the unpipelined
# compressed allreduce int8@64M/onebit@64M, for before/after in the same run) join every
# sweep; the @64M ones join the forced runs too. Every run is bounded and, with
# RR_BENCH_LOCK=FILE set, holds that lock (flock).
# Links: tbf rate limit only, no added delay (no netem on this kernel).
set -u
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:?usage: bench_cluster.sh OUTDIR [KxM@RATE ...]}; shift
layouts=${*:-2x1@1gbit 4x1@1gbit 2x2@1gbit 2x1@10gbit 4x1@10gbit}
FORCED=${FORCED:-"4 5 6"}      # Open MPI tuned allreduce: 4 ring, 5 segmented ring, 6 rabenseifner
REPS=${REPS:-5}
EXTRA_COLS=${EXTRA_COLS-auto,int8@64M,onebit@64M}
mkdir -p "$out"
run() {  # run NAME K M RATE TIMEOUT [--mpi-arg ...] -- bench args
    local name=$1 k=$2 m=$3 rate=$4 limit=$5; shift 5
    local margs=()
    while [ "$1" != "--" ]; do margs+=("$1"); shift; done; shift
    echo "== $name" >&2
    ${RR_BENCH_LOCK:+flock "$RR_BENCH_LOCK"} "$here/cluster.sh" run --nodes "$k" --ranks-per-node "$m" --rate "$rate" \
        --timeout "$limit" --json "$out/$name.links.json" "${margs[@]}" -- \
        python "$here/bench_cluster.py" --json "$out/$name.json" "$@" > "$out/$name.log" 2>&1
    echo "   rc=$? $(grep -c ' ok$' "$out/$name.log") rows ok, $(grep -c 'BAD$' "$out/$name.log") bad" >&2
}
for lay in $layouts; do
    km=${lay%@*}; rate=${lay#*@}; k=${km%x*}; m=${km#*x}
    gbit=$(python -c "import sys;r=sys.argv[1];print(float(r[:-4])*(1 if r.endswith('gbit') else 1e-3))" "$rate")
    cols=mpi,ring,tree,hierarchical,int8,int4,onebit
    [ "$m" -gt 1 ] && cols=$cols,hier+int8,hier+onebit
    [ -n "$EXTRA_COLS" ] && cols=$cols,$EXTRA_COLS
    fcols=mpi,ring,int8,onebit
    for c in ${EXTRA_COLS//,/ }; do case $c in *@*) fcols=$fcols,$c ;; esac; done
    run "${km}_${rate}_sweep" "$k" "$m" "$rate" 240 -- -b 4K -e 64M -f 4 -r "$REPS" -a "$cols" \
        --rate-gbit "$gbit" --floor --label "native=default"
    for alg in $FORCED; do
        run "${km}_${rate}_forced$alg" "$k" "$m" "$rate" 150 \
            --mpi-arg=--mca --mpi-arg=coll_tuned_use_dynamic_rules --mpi-arg=1 \
            --mpi-arg=--mca --mpi-arg=coll_tuned_allreduce_algorithm --mpi-arg="$alg" -- \
            -b 64M -e 64M -r "$REPS" -a "$fcols" --rate-gbit "$gbit" \
            --label "native=forced$alg"
    done
done
python "$here/bench_report.py" "$out"
