# Shared by the slurm/*.sbatch templates: sourced by them, not run or submitted itself.
#
# A template finds this file next to itself (Slurm runs a copy of the batch script from its spool
# directory, so the template asks `scontrol show job` for the path it was submitted from; set
# HPC_DGRAB_HOME to the repository to override).
#
#   hpc_dgrab_activate         activate the venv in $HPC_DGRAB_ENV (a directory with bin/activate)
#   hpc_dgrab_train_args DIR ARGS...
#                              HPC_DGRAB_ARGS = ARGS plus, unless ARGS have them,
#                              --checkpoint-dir DIR/checkpoints --metrics DIR/metrics.jsonl --resume
#   hpc_dgrab_run CMD...       run the launcher (srun / mpirun) in the background; forward USR1 and
#                              TERM from this batch shell to it (as USR1); when it exits 75 (the trainer wrote
#                              a checkpoint after the signal) requeue the job, unless this shell got TERM
#                              (scancel, preemption: Slurm requeues preempted jobs itself); else exit
#                              with its code.

EXIT_PREEMPTED=75   # hpc_dgrab.errors.EXIT_PREEMPTED

hpc_dgrab_log() { echo "[$(date -u +%H:%M:%S) ${SLURM_JOB_ID:-nojob}] $*"; }

hpc_dgrab_activate() {
  [ -n "${HPC_DGRAB_ENV:-}" ] || return 0
  if [ ! -f "$HPC_DGRAB_ENV/bin/activate" ]; then
    echo "error: HPC_DGRAB_ENV=$HPC_DGRAB_ENV: no bin/activate there (give a virtual environment's directory)" >&2
    exit 2
  fi
  # shellcheck disable=SC1091
  source "$HPC_DGRAB_ENV/bin/activate"
}

_hpc_dgrab_has() {  # _hpc_dgrab_has FLAG ARGS...: is FLAG (or FLAG=value) among ARGS?
  local flag=$1 a
  shift
  for a in "$@"; do case "$a" in "$flag" | "$flag"=*) return 0 ;; esac; done
  return 1
}

hpc_dgrab_train_args() {
  local dir=$1
  shift
  HPC_DGRAB_ARGS=("$@")
  _hpc_dgrab_has --checkpoint-dir "$@" || HPC_DGRAB_ARGS+=(--checkpoint-dir "$dir/checkpoints")
  _hpc_dgrab_has --metrics "$@" || HPC_DGRAB_ARGS+=(--metrics "$dir/metrics.jsonl")
  _hpc_dgrab_has --resume "$@" || HPC_DGRAB_ARGS+=(--resume)
  mkdir -p "$dir"
}

_hpc_dgrab_forward() {  # trap handler: pass the signal on to the launcher, which passes it to every rank
  # always as USR1: srun and mpirun both forward USR1 to the ranks, while mpirun answers TERM by
  # killing them; the trainer treats TERM and USR1 alike
  hpc_dgrab_log "got SIG$1: sending USR1 to the ranks (they checkpoint at the next step and exit $EXIT_PREEMPTED)"
  _HPC_DGRAB_GOT="${_HPC_DGRAB_GOT:-} $1"
  kill -s USR1 "$2" 2>/dev/null || true
}

hpc_dgrab_run() {
  hpc_dgrab_log "SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0} nodes=${SLURM_JOB_NODELIST:-?} tasks=${SLURM_NTASKS:-?}"
  hpc_dgrab_log "run: $*"
  "$@" &
  local pid=$! rc
  # shellcheck disable=SC2064
  trap "_hpc_dgrab_forward USR1 $pid" USR1
  # shellcheck disable=SC2064
  trap "_hpc_dgrab_forward TERM $pid" TERM
  # `wait` returns early whenever a trapped signal arrives: wait until the launcher has really ended
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
  wait "$pid" && rc=0 || rc=$?
  if [ "$rc" -eq "$EXIT_PREEMPTED" ]; then
    case "${_HPC_DGRAB_GOT:-}" in
      *TERM*)  # scancel, or preemption (where Slurm requeues by itself if its PreemptMode says so)
        hpc_dgrab_log "the trainer checkpointed and stopped (exit $rc) after SIGTERM (cancelled or" \
          "preempted): not requeueing; the same arguments with this run's --checkpoint-dir continue it" ;;
      *)
        hpc_dgrab_log "the trainer checkpointed and stopped (exit $rc): requeueing job ${SLURM_JOB_ID}"
        if scontrol requeue "${SLURM_JOB_ID}"; then
          exit 0  # the job runs again from the top and resumes from the checkpoint
        fi
        hpc_dgrab_log "requeue refused: submit again with --checkpoint-dir of this run to continue" ;;
    esac
  fi
  hpc_dgrab_log "exit $rc"
  exit "$rc"
}
