#!/usr/bin/env bash
# Submit the five steps, each starting only when the one before succeeded (every array task).
#   apptainer build kukla-cuda.sif docker-daemon://kukla:cuda   # from docker/Dockerfile.cuda
#   RUN=/scratch/$USER/kukla/gemma-2-2b IMAGE=$PWD/kukla-cuda.sif docker/slurm/submit.sh
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p "${RUN:-/scratch/kukla/gemma-2-2b}"
harvest=$(sbatch --parsable harvest.sbatch)
workers=$(sbatch --parsable --dependency=afterok:"$harvest" finalize.sbatch)
finalize=$(sbatch --parsable --dependency=afterok:"$workers" finalize-commit.sbatch)
train=$(sbatch --parsable --dependency=afterok:"$finalize" train.sbatch)
sbatch --dependency=afterok:"$train" evaluate.sbatch
