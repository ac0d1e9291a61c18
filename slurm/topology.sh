# Sourced by slurm/*.sbatch inside a job, on its first node: the job's topology as the variables launch/torchrun.sh
# reads (NNODES, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE) and srun reads (SRUN_CPUS_PER_TASK), plus
# OMP_NUM_THREADS and a one-line summary in TOPOLOGY. Each srun task finds its own node rank in SLURM_NODEID.
# sbatch hands the job the submit shell's environment: only CARBRAND_MASTER_ADDR, MASTER_PORT and NPROC_PER_NODE
# from there count, each on purpose; a MASTER_ADDR or NODE_RANK left from a run by hand does not.

rendezvous_port() {  # a port free now on this node, outside the kernel's ephemeral range; job id $1 picks where to start
    python3 - "$1" <<'EOF'
import socket, sys
low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
# Any outgoing connection may take an ephemeral port between our look and torchrun's bind: stay out of that range,
# and above 20000, clear of the usual services' ports.
candidates = [*range(20000, low), *range(max(high + 1, 20000), 65536)]
# Starting at the job id, consecutive jobs starting together on one node look at different ports first.
start = int(sys.argv[1]) % len(candidates) if candidates else 0
for port in candidates[start:] + candidates[:start] or [0]:  # [0]: no such range, let the kernel choose
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
        except OSError:
            continue  # taken: another job's rendezvous, or any other server
        print(probe.getsockname()[1])
        break
else:
    sys.exit(f"slurm/topology.sh: no free port on {socket.gethostname()} outside the ephemeral range {low}-{high}")
EOF
}

unset NODE_RANK  # one exported from the submitting shell would give every node the same rank
nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
first_node=${nodes%%$'\n'*}
# SLURM's own address for the first node (NodeAddr): node names do not always resolve.
node_line=$(scontrol -o show node "$first_node")
node_addr=${node_line#*NodeAddr=}
MASTER_ADDR=${CARBRAND_MASTER_ADDR:-${node_addr%% *}}
MASTER_PORT=${MASTER_PORT:-$(rendezvous_port "$SLURM_JOB_ID")}
NNODES=$SLURM_JOB_NUM_NODES
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}  # one process per GPU; 1 on CPU-only nodes
# Since SLURM 22.05 srun no longer takes the job's --cpus-per-task: without it, each node's one task (all its
# ranks and their loader threads) would get srun's default of 1 CPU wherever tasks are bound to their CPUs.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
else
    unset SRUN_CPUS_PER_TASK  # the job asked for no CPU count: srun's default, not one from the submit shell
fi
cpus_per_task=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
# torchrun would set 1 thread per process; CPU work (decoding, CPU training) wants the task's CPUs shared out
OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus_per_task / NPROC_PER_NODE > 1 ? cpus_per_task / NPROC_PER_NODE : 1 ))}
export MASTER_ADDR MASTER_PORT NNODES NPROC_PER_NODE OMP_NUM_THREADS
TOPOLOGY="${NNODES} node(s) ${SLURM_JOB_NODELIST} x ${NPROC_PER_NODE} process(es) = world size $(( NNODES * NPROC_PER_NODE )); \
${cpus_per_task} CPU(s) per task, OMP_NUM_THREADS=${OMP_NUM_THREADS}, GPUs per node: ${SLURM_GPUS_ON_NODE:-none}; \
partition ${SLURM_JOB_PARTITION:-?}; rendezvous c10d at ${MASTER_ADDR}:${MASTER_PORT}"
