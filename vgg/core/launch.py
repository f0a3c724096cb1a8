"""`--gpus N` on one machine: the script again as N processes, their stop signals and their errors.

`launch_if_needed` starts N copies of the command line with torchrun's variables (RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), waits for them, and exits with their code:

- Stop signals (SIGINT, SIGTERM, SIGUSR1, SIGHUP) sent to the launcher, or to its process group as
  Ctrl-C, a closed terminal, SLURM and Kubernetes send them, reach each process once: the processes run
  in sessions of their own and the launcher passes each signal on. They stop at the same step, rank 0
  saves, and the launcher exits with their code (128 + the signal). The launcher keeps its handlers
  from before it starts the processes until it has printed their lines and removed its report folder,
  so no later signal ends it half way. A process whose launcher dies gets SIGTERM (Linux).
- Errors: a process reports its one line through `report` into a folder the launcher reads once all
  have ended, so bad input that every process finds is printed once, last. A process that failed only
  because a peer left (a collective on a closed connection) reports nothing: its peer's line says why.
- A process that fails leaves its peers FAIL_GRACE_S to end by themselves; then they are killed.

Several machines run torchrun or srun themselves (vgg/core/distributed.py reads either's variables).
"""

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vgg.core.errors import UserError

# The signals that ask a run to stop at its next sync point, save last.pt and exit with 128 + signal:
# Ctrl-C; SIGTERM (kill, and SLURM's preemption or scancel); SIGUSR1 (the warning SLURM sends before
# the time limit, as scripts/slurm/ ask for it: that exit, 138, means "requeue me"); SIGHUP (a closed
# terminal, a dropped ssh). The launcher passes them on, DataLoader workers ignore them, the training
# run handles them (vgg/training/signals.py).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
REPORTS_ENV = "VGG_LAUNCH_REPORTS"  # the folder a launched process writes its one line into
FAIL_GRACE_S = 20.0  # how long a failed process's peers have to end by themselves before they are killed
PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "connectfullmesh",
             "socket timeout", "connection refused")  # gloo's and the store's words for a peer that left


def launch_if_needed(gpus: int, device: str = "auto") -> None:
    """With --gpus N > 1 and not already one of N processes: run this script as N processes, then exit
    with their code. UserError where PyTorch sees fewer than N GPUs and --device cpu was not asked for."""
    if gpus <= 1 or "RANK" in os.environ:
        return
    if device != "cpu":
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if found < gpus:
            raise UserError(f"--gpus {gpus} asks for {gpus} GPUs, but PyTorch sees "
                            f"{found or 'no CUDA GPU'}: add --device cpu to run {gpus} CPU processes instead, "
                            f"or pass --gpus {max(found, 1)}")
        print(f"--gpus {gpus}: {gpus} processes, one per GPU (NCCL)", file=sys.stderr, flush=True)
    else:
        print(f"--gpus {gpus} --device cpu: {gpus} CPU processes (gloo) on this machine", file=sys.stderr,
              flush=True)
    with _passing_on(STOP_SIGNALS) as children, tempfile.TemporaryDirectory(prefix="vgg-launch-") as reports:
        _start(gpus, device, Path(reports), children)
        killed = _wait(children)
        code = _report_and_code([child.returncode for child in children], Path(reports), killed)
    sys.exit(code)


def report(line: str, *, peer_lost: bool = False) -> None:
    """A process's one line for the user (`error: ...`): to the launcher where one started this process
    (it prints each distinct line once), else to stderr, with `[rank k] ` on ranks other than 0.
    peer_lost: the line of a process that failed because a peer left; the launcher prints it only where
    no process said more."""
    rank = int(os.environ.get("RANK", "0"))
    folder = os.environ.get(REPORTS_ENV)
    if folder and os.path.isdir(folder):
        with open(Path(folder) / f"{rank}.{'peer' if peer_lost else 'line'}", "w") as f:
            f.write(line.strip() + "\n")
        return
    print(f"[rank {rank}] {line}" if rank else line, file=sys.stderr, flush=True)


def lost_a_peer(error: BaseException) -> bool:
    """Whether `error` is a collective or rendezvous failing because another process of the job left."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and any(words in str(error).lower() for words in PEER_LOST)


def _start(gpus: int, device: str, reports: Path, children: list[subprocess.Popen]) -> None:
    """The N processes, into `children`. A stop signal that comes while they start waits (blocked) until all
    are in the list, then reaches every one; each process starts with the launcher's signal mask as it was."""
    with socket.socket() as s:  # a free port for rank 0's store (torchrun --standalone does the same)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(gpus),
               LOCAL_WORLD_SIZE=str(gpus), GROUP_RANK="0", **{REPORTS_ENV: str(reports)})
    if device != "cpu":  # torchrun's default for GPU processes; on the CPU set_cpu_threads splits the cores
        env.setdefault("OMP_NUM_THREADS", "1")
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        children += [subprocess.Popen([sys.executable, sys.argv[0], *sys.argv[1:]], start_new_session=True,
                                      preexec_fn=lambda: _prepare_process(mask),
                                      env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "ROLE_RANK": str(rank)})
                     for rank in range(gpus)]
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _prepare_process(mask) -> None:
    """In a launched process before it runs: the signal mask the launcher had, and SIGTERM (a stop, with a
    save) when the launcher dies (Linux)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def _passing_on(signals):
    """Each of `signals` the launcher gets goes on to every process still running, once; yields the list
    of processes to fill. After they have all ended a signal does nothing: the launcher is on its way out."""
    children = []

    def pass_on(signum, frame):
        for child in children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signum)

    previous = {signum: signal.signal(signum, pass_on) for signum in signals}
    try:
        yield children
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _wait(children: list[subprocess.Popen]) -> set[int]:
    """Until every process has ended; once one has failed, the others get FAIL_GRACE_S, then SIGKILL.
    Returns the ranks killed so."""
    failed_at, killed = None, set()
    while any(child.poll() is None for child in children):
        if failed_at is None and any(child.returncode not in (None, 0) for child in children):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > FAIL_GRACE_S:
            for rank, child in enumerate(children):
                if child.poll() is None:
                    killed.add(rank)
                    with contextlib.suppress(ProcessLookupError):
                        child.kill()
        time.sleep(0.1)
    return killed


def _report_and_code(codes: list[int], reports: Path, killed_here: set[int]) -> int:
    """Print each distinct line the processes reported once (the lowest rank's; `[rank k] ` on others), and
    return the exit code: that of the first process that reported a line; else 128 + the signal that
    killed a process (it could not say why); else the first non-zero code (0 when all succeeded)."""
    lines = _distinct_lines(reports, len(codes), "line")
    if not lines and not any(code < 0 for rank, code in enumerate(codes) if rank not in killed_here):
        lines = _distinct_lines(reports, len(codes), "peer")  # only peers that lost a peer said anything
    for line, rank in lines.items():
        _say(f"[rank {rank}] {line}" if rank else line)
    reporting = [codes[rank] for rank in sorted(lines.values()) if codes[rank] != 0]
    if reporting:
        return reporting[0]
    for rank, code in enumerate(codes):
        if code < 0 and rank not in killed_here:
            _say(f"error: process rank {rank} was killed by {signal.Signals(-code).name}")
            return 128 - code
    return next((code for code in codes if code != 0), 0)


def _say(line: str) -> None:
    """A line to stderr, which may be gone (a closed terminal: SIGHUP, then EIO): the exit code still counts."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)


def _distinct_lines(reports: Path, world_size: int, kind: str) -> dict[str, int]:
    """Each distinct line the processes wrote as `RANK.KIND`, with the lowest rank that wrote it."""
    lines = {}
    for rank in range(world_size):
        path = reports / f"{rank}.{kind}"
        if path.is_file():
            lines.setdefault(path.read_text().strip(), rank)
    return lines
