#!/bin/bash
# "ssh" stand-in for Open MPI (--prtemca plm_ssh_agent THIS_SCRIPT): runs the daemon command
# inside the network namespace that owns the target address instead of on a remote host.
#
#   netns_ssh.sh [ssh options] HOST COMMAND...
#
# HOST -> namespace comes from the run's hostmap ("ADDRESS NAMESPACE IFACE" per line), found
# through $RRC_HOSTMAP (set by cluster.py) or else in any live run under $RRC_STATE_ROOT.
# Each node also gets its own UTS namespace whose hostname is the namespace name: with one
# shared hostname Open MPI's node-local names (session dirs, shared-memory segments,
# COMM_TYPE_SHARED) collide across "nodes" and jobs hang or split wrongly.
set -euo pipefail

# Skip ssh-style options Open MPI might pass (-x, -o X, -p N, ...).
while [[ $# -gt 0 && $1 == -* ]]; do
    case $1 in
        -o|-p|-l|-i|-F) shift 2 ;;
        *) shift ;;
    esac
done
[[ $# -ge 2 ]] || { echo "netns_ssh.sh: usage: netns_ssh.sh HOST COMMAND..." >&2; exit 255; }
host=$1; shift

root=${RRC_STATE_ROOT:-/run/ringreduce-cluster}
maps=()
if [[ -n ${RRC_HOSTMAP:-} ]]; then maps=("$RRC_HOSTMAP"); else maps=("$root"/*/hostmap); fi
ns=""; iface=""
for m in "${maps[@]}"; do
    [[ -f $m ]] || continue
    read -r _ ns iface < <(awk -v h="$host" '$1 == h {print; exit}' "$m") || true
    [[ -n $ns ]] && break
done
if [[ -z $ns ]]; then
    echo "netns_ssh.sh: no emulated node has address $host (hostmap: ${maps[*]})" >&2
    exit 255
fi

# bash -c gets the whole command as one string, as sshd would hand it to the login shell.
# GLOO_SOCKET_IFNAME: gloo (torch DDP) would otherwise resolve the hostname, which is unknown.
exec ip netns exec "$ns" unshare --uts env RINGREDUCE_NODE_ID="$ns" RRC_NODE="$ns" \
    RRC_IFACE="$iface" GLOO_SOCKET_IFNAME="$iface" bash -c "hostname '$ns' && { $*; }"
