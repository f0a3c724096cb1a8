# Sourced by the sbatch templates here. `run_requeueable COMMAND...` runs the training job step so that
# it survives SLURM's time limit:
#
# - `#SBATCH --signal=B:USR1@300` makes SLURM send USR1 to this batch script 300 s before the limit.
#   The script passes it on to every process of the job's steps on every node (`scancel --signal`;
#   torchrun does not forward USR1, so the templates start it with USR1 ignored and the signal goes to
#   the training processes themselves). They agree at their next sync point, save a mid-epoch last.pt
#   and exit with 138 (128 + USR1).
# - The job then requeues itself (`scontrol requeue`); started again, `--resume if-exists` continues
#   from last.pt. Where scontrol cannot requeue, the script exits with 138: the run is saved, submit
#   the same script again.
# - Preemption and scancel send SIGTERM to every process: the training processes save and exit with
#   143 (128 + TERM); with `--requeue` SLURM requeues a preempted job itself.
#
# Exit codes: the job step's own (0 when training finished), or 138 after the time-limit warning.

REQUEUE_EXIT_CODE=138

run_requeueable() {
    local warned="" pid rc
    trap 'warned=1; echo "time-limit warning (USR1): asking the training processes to save and stop"; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
    "$@" &  # in the background: bash runs a trap only between commands, and `wait` returns for it
    pid=$!
    while :; do
        wait "$pid"
        rc=$?
        kill -0 "$pid" 2>/dev/null || break  # still running: `wait` returned for the trap, wait again
    done
    trap - USR1
    if [ -z "$warned" ]; then
        return "$rc"
    fi
    if command -v scontrol >/dev/null && scontrol requeue "$SLURM_JOB_ID"; then
        echo "requeued job $SLURM_JOB_ID: it goes on from last.pt when it starts again"
    else
        echo "could not requeue job $SLURM_JOB_ID: submit the same script again to go on from last.pt"
    fi
    return "$REQUEUE_EXIT_CODE"
}
