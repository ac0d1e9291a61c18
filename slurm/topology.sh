# Sourced by slurm/*.sbatch inside a job: the job's topology as the variables launch/torchrun.sh reads
# (NNODES, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE), plus OMP_NUM_THREADS and a one-line summary in TOPOLOGY.
# Each srun task finds its own node rank in SLURM_NODEID.

unset NODE_RANK  # one exported from the submitting shell would give every node the same rank
nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
first_node=${nodes%%$'\n'*}
# SLURM's own address for the first node (NodeAddr): node names do not always resolve.
node_line=$(scontrol -o show node "$first_node")
node_addr=${node_line#*NodeAddr=}
MASTER_ADDR=${MASTER_ADDR:-${node_addr%% *}}
MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}  # jobs sharing a node rarely collide
NNODES=$SLURM_JOB_NUM_NODES
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}  # one process per GPU; 1 on CPU-only nodes
cpus_per_task=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
# torchrun would set 1 thread per process; CPU work (decoding, CPU training) wants the task's CPUs shared out
OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus_per_task / NPROC_PER_NODE > 1 ? cpus_per_task / NPROC_PER_NODE : 1 ))}
export MASTER_ADDR MASTER_PORT NNODES NPROC_PER_NODE OMP_NUM_THREADS
TOPOLOGY="${NNODES} node(s) ${SLURM_JOB_NODELIST} x ${NPROC_PER_NODE} process(es) = world size $(( NNODES * NPROC_PER_NODE )); \
${cpus_per_task} CPU(s) per task, OMP_NUM_THREADS=${OMP_NUM_THREADS}, GPUs per node: ${SLURM_GPUS_ON_NODE:-none}; \
partition ${SLURM_JOB_PARTITION:-?}; rendezvous c10d at ${MASTER_ADDR}:${MASTER_PORT}"
