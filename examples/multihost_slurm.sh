#!/usr/bin/env bash
# One jaxserve engine over several hosts with Slurm: one task per node, process 0 serves.
#
#   sbatch --nodes=2 --ntasks-per-node=1 examples/multihost_slurm.sh /models/my-model
#
# Every task runs the same command; Slurm's variables give each its process id, and the first
# node's hostname is the jax.distributed coordinator. Only process 0 opens the HTTP and gRPC
# ports; the others replay its steps (tensor parallelism across all of them).
#SBATCH --job-name=jaxserve
#SBATCH --ntasks-per-node=1
set -euo pipefail
MODEL="${1:?usage: examples/multihost_slurm.sh MODEL}"
COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):23456"
srun bash -c "jaxserve serve '$MODEL' \
  --num-processes \$SLURM_NTASKS --process-id \$SLURM_PROCID \
  --coordinator-address $COORDINATOR \
  --tensor-parallel-size \$SLURM_NTASKS --host 0.0.0.0 --port 8000"
