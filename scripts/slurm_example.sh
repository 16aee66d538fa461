#!/usr/bin/env bash
# Send the DGMP paper's writer-identification comparison (5 operators x 5 seeds) to SLURM.
#
# Run this on a login node, inside a tmux/screen session: `poolbench sweep` submits one job array
# through submitit, then watches it (live view, ETA) until every run has finished. Every job runs
# `poolbench train` for one config in <results_dir>/<run-id>/; submitit's logs and pickles go to
# <results_dir>/.submitit/<job-id>/.
#
# The runs not completed yet go to SLURM as ONE job array; --jobs N is its %N throttle (SLURM never
# runs more than N of the sweep's tasks at once). submitit's own messages go to
# <results_dir>/.submitit/sweep.log; a failed task's line names its log file.
#
# Resuming: every task runs with trainer.resume=true and checkpoints each epoch. A task that SLURM
# requeues (scontrol requeue, preemption) or that gets SIGTERM while running (it then requeues
# itself) continues from its last checkpoint. If the watching process itself dies, the array keeps
# running; run the same command again: finished runs are skipped, unfinished ones resume, and runs
# still held by a live task are left to it. After `scancel <array id>` the same command resumes too.
#
# Usage: scripts/slurm_example.sh /path/to/icdar17 [extra poolbench overrides or options...]
set -euo pipefail

DATA_ROOT=${1:?usage: $0 /path/to/icdar17 [more overrides/options]}
shift

# The results directory must be on a filesystem shared by the login and compute nodes.
RESULTS_DIR=${RESULTS_DIR:-$PWD/results/runs}

# First look at what would run (nothing is submitted):
poolbench sweep experiment=dgmp_paper dataset.root="$DATA_ROOT" results_dir="$RESULTS_DIR" --dry-run "$@"

# --jobs caps how many array tasks run at once (slurm_array_parallelism); one GPU per run.
poolbench sweep experiment=dgmp_paper dataset.root="$DATA_ROOT" results_dir="$RESULTS_DIR" \
  --executor slurm \
  --jobs 10 \
  --slurm-partition "${SLURM_PARTITION:-gpu}" \
  --gpus-per-node 1 \
  --cpus-per-task 8 \
  --mem-gb 32 \
  --timeout-min 1440 \
  "$@"
# Site-specific options pass through, e.g. --slurm-param slurm_account=myproject
#                                          --slurm-param slurm_constraint=a100

poolbench report "$RESULTS_DIR" --where experiment=dgmp_paper --baseline avg --metric mAP --metric top1 \
  --metric latency.infer_image_ms
