#!/usr/bin/env bash
# One node's share of a training (or evaluation) job: torchrun with c10d rendezvous at the first
# node, and SIGUSR1/SIGTERM forwarded to every worker (launch/torchrun_forward_signals.py says why).
#
#   # 2 nodes x 8 GPUs, the first node reachable at 10.0.0.1; on the first node:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#       launch/torchrun.sh carbrand/train.py --config configs/stanford_cars.yaml
#   # on the second node: the same with NODE_RANK=1
#
# Variables (default):
#   NNODES          number of nodes (SLURM_NNODES, else 1)
#   NODE_RANK       this node, 0..NNODES-1 (SLURM_NODEID, else 0); node 0 hosts the rendezvous
#   MASTER_ADDR     address of node 0 (127.0.0.1)
#   MASTER_PORT     rendezvous port on node 0 (29500)
#   NPROC_PER_NODE  processes on this node (alias GPUS_PER_NODE; SLURM_GPUS_ON_NODE, else the
#                   number of GPUs nvidia-smi lists, else 1 for a CPU-only node)
#   RDZV_ID         the same on every node of one job (SLURM_JOB_ID.SLURM_RESTART_COUNT, else carbrand-MASTER_PORT)
#   LOCAL_ADDR      this node's address as the other nodes reach it (under SLURM its NodeAddr; on node 0
#                   MASTER_ADDR; elsewhere the address this node reaches MASTER_ADDR from)
# Exit code: 143 when the workers stopped on a signal after saving a checkpoint, so a batch script can requeue.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

gpus_here() {  # the GPUs nvidia-smi lists, or 1 (one CPU process) where there are none
    local count=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    echo $(( count > 0 ? count : 1 ))
}

nnodes=${NNODES:-${SLURM_NNODES:-1}}
node_rank=${NODE_RANK:-${SLURM_NODEID:-0}}
master_addr=${MASTER_ADDR:-127.0.0.1}
master_port=${MASTER_PORT:-29500}
nproc=${NPROC_PER_NODE:-${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(gpus_here)}}}
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    rdzv_id=${RDZV_ID:-${SLURM_JOB_ID}.${SLURM_RESTART_COUNT:-0}}  # a requeued job meets afresh
else
    rdzv_id=${RDZV_ID:-carbrand-${master_port}}
fi

local_address() {  # this node's address as the other nodes reach it, for torchrun's --local-addr
    local node_line
    if [[ -n ${LOCAL_ADDR:-} ]]; then
        echo "$LOCAL_ADDR"
    elif [[ -n ${SLURMD_NODENAME:-} ]] && node_line=$(scontrol -o show node "$SLURMD_NODENAME" 2>/dev/null); then
        node_line=${node_line#*NodeAddr=}  # SLURM's own address for this node: node names need not resolve
        echo "${node_line%% *}"
    elif (( node_rank == 0 )); then
        echo "$master_addr"
    else  # the source address of the route to node 0 (a UDP connect sends nothing); none: torchrun's host name
        python3 - "$master_addr" "$master_port" <<'EOF' 2>/dev/null || true
import socket, sys
family, kind, _, _, address = socket.getaddrinfo(sys.argv[1], int(sys.argv[2]), type=socket.SOCK_DGRAM)[0]
with socket.socket(family, kind) as probe:
    probe.connect(address)
    print(probe.getsockname()[0])
EOF
    fi
}

whole_number() {
    [[ $2 =~ ^[0-9]+$ ]] || { echo "launch/torchrun.sh: $1 must be a whole number, not '$2'" >&2; exit 2; }
}
whole_number NNODES "$nnodes"
whole_number NODE_RANK "$node_rank"
whole_number MASTER_PORT "$master_port"
whole_number NPROC_PER_NODE "$nproc"
(( nnodes > 0 && nproc > 0 )) || { echo "launch/torchrun.sh: NNODES and NPROC_PER_NODE must be at least 1" >&2; exit 2; }
(( node_rank < nnodes )) || { echo "launch/torchrun.sh: NODE_RANK ${node_rank} must be below NNODES ${nnodes}" >&2; exit 2; }
(( $# > 0 )) || { echo "usage: [NNODES=.. NODE_RANK=.. MASTER_ADDR=.. MASTER_PORT=.. NPROC_PER_NODE=..] launch/torchrun.sh SCRIPT.py [ARGS...]" >&2; exit 2; }

# Node 0 serves the rendezvous store; the others only connect (on one host both would try to serve).
is_host=$(( node_rank == 0 ? 1 : 0 ))
# Whichever node's launcher the rendezvous makes rank 0 (it sorts them by address, so not always node 0) hands
# its address to all workers as MASTER_ADDR; without --local-addr that is its host name, which need not resolve.
local_addr=$(local_address)
[[ -z $local_addr ]] || set -- --local-addr "$local_addr" "$@"
# the CPUs this node's processes may use (SLURM binds its tasks to them): each worker inherits them
cpus=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/self/status 2>/dev/null || true)
echo "launch/torchrun.sh: node ${node_rank}/${nnodes} at ${local_addr:-its host name}, ${nproc} process(es) on CPU(s) ${cpus:-?}; \
rendezvous c10d at ${master_addr}:${master_port} (id ${rdzv_id})"
exec python3 "$here/torchrun_forward_signals.py" \
    --nnodes "$nnodes" --nproc-per-node "$nproc" \
    --rdzv-backend c10d --rdzv-endpoint "${master_addr}:${master_port}" --rdzv-id "$rdzv_id" \
    --rdzv-conf "is_host=${is_host}" --max-restarts 0 \
    "$@"
