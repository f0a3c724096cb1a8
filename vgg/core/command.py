"""The body every command line that runs nets over a dataset shares (evaluate.py, transfer.py): check the
input, start the --gpus N processes, run, and turn bad input and out-of-memory into one line and exit 2."""

from vgg.core.distributed import cleanup_distributed, init_distributed, set_cpu_threads
from vgg.core.errors import UserError, out_of_memory_message
from vgg.core.launch import launch_if_needed, report


def run_command(args, prepare, run, out_of_memory_advice: str) -> int:
    """prepare(args) -> a tuple, checked before any process starts; then run(args, *that tuple, dist) in each
    process (args.gpus, args.device, args.workers). Returns the exit code: 0, or 2 after one `error:` line."""
    try:
        prepared = prepare(args)
        launch_if_needed(args.gpus, args.device)  # --gpus N: re-run the script as N processes, then exit
        set_cpu_threads(args.device, args.workers)  # the first log line: how many threads on a CPU run
        dist = init_distributed(args.device)
        try:
            run(args, *prepared, dist)
        finally:
            cleanup_distributed()
    except UserError as e:
        report(f"error: {e}")
        return 2
    except (RuntimeError, MemoryError) as e:
        message = out_of_memory_message(e, out_of_memory_advice)
        if message is None:
            raise
        report(f"error: {message}")
        return 2
    return 0
