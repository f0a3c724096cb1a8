"""Processes: process-group setup, reductions, launching, SLURM's environment, CPU threads.

One GPU or many use the same code. `--gpus N` (N > 1) re-executes the script as N processes on this
machine (vgg/core/launch.py); several machines run it under torchrun directly (or under SLURM's `srun`, one task per GPU:
see scripts/slurm/). Either way the script finds torchrun's RANK / WORLD_SIZE / LOCAL_RANK (or
SLURM's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID) in its environment and `init_distributed` joins
the process group: NCCL on CUDA, gloo on CPU (so tests can run two processes on a machine without a GPU).
"""

import contextlib
import datetime
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vgg.core.errors import UserError
from vgg.core.progress import get_logger, setup_logging

RELEASE_WAIT_S = 10.0  # all_reduce_sum: at most this long for gloo to release a tensor (microseconds normally)
# How long `barrier` waits for the slowest rank: rank 0's scan of ImageNet's 1.28 M files and its statistics
# over 10 000 images take minutes on a network file system, hours on a very slow one; a rank that fails or
# dies ends the wait at once, so a long timeout costs nothing in a healthy job.
WAIT_TIMEOUT = datetime.timedelta(hours=12)
_WAITING_GROUP = None  # the gloo group `barrier` waits on (_waiting_group)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" if PyTorch sees a GPU, else "cpu"; other names unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group if torchrun started us; pick this process's device.

    device: "auto" (CUDA if available, else CPU), "cuda" or "cpu".
    """
    device = resolve_device(device)
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU (use --device cpu)")
    if device not in ("cuda", "cpu"):
        raise UserError(f"unknown device {device!r}: choose auto, cuda or cpu")

    os.environ.update(slurm_process_env(os.environ))  # plain `srun`: SLURM's names, as torchrun's
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")

    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        kwargs = {"device_id": torch_device} if device == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    if distributed:
        _waiting_group()  # every rank here at once: the group's own setup waits on no one's scan
    setup_logging(rank)
    return DistInfo(rank, world_size, local_rank, torch_device, distributed)


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.parallel.DistributedDataParallel:
    """DDP around `model` (already on this process's device). The gradients are views into DDP's
    all-reduce buckets, so no copy into and out of the buckets is made each step."""
    device_ids = [info.local_rank] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


# The rendezvous port of a plain-`srun` job when MASTER_PORT is not set: torchrun's default plus the job
# ID modulo 10000, so that two jobs sharing a node do not meet on one port.
DEFAULT_MASTER_PORT = 29500


def slurm_process_env(environ) -> dict[str, str]:
    """torchrun's variables from SLURM's, for a process started by plain `srun` (one task per GPU).

    Empty when torchrun (RANK set) or no `srun` step (no SLURM_PROCID) started this process.
    RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID, MASTER_ADDR = the
    first host of SLURM_JOB_NODELIST, MASTER_PORT = DEFAULT_MASTER_PORT + SLURM_JOB_ID % 10000 unless set.
    """
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return {}
    job = environ.get("SLURM_JOB_ID", "0")
    port = DEFAULT_MASTER_PORT + (int(job) % 10000 if job.isdigit() else 0)
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "localhost"
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ.get("SLURM_NTASKS", "1"),
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(nodelist),
            "MASTER_PORT": environ.get("MASTER_PORT") or str(port)}


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `scontrol show hostnames` where SLURM is installed, else
    `expand_nodelist` (which reads the common forms)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 check=True, timeout=60).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_nodelist(nodelist)[0]


def expand_nodelist(nodelist: str) -> list[str]:
    """`gpu[01-03,7],login1` -> [gpu01, gpu02, gpu03, gpu7, login1]: SLURM's host list with at most one
    bracket per name, at its end (zero padding kept). UserError for a form it does not read."""
    entries = re.findall(r"[^,\[]+(?:\[[^\]]*\])?", nodelist)
    if not entries or ",".join(entries) != nodelist:
        raise UserError(f"cannot read the SLURM node list {nodelist!r}: set MASTER_ADDR to the first node's name")
    hosts = []
    for entry in entries:
        name, _, ranges = entry.partition("[")
        for part in ranges.rstrip("]").split(",") if ranges else [""]:
            low, _, high = part.partition("-")
            if not part:
                hosts.append(name)
                continue
            if not low.isdigit() or (high and not high.isdigit()):
                raise UserError(f"cannot read the SLURM node list {nodelist!r}: set MASTER_ADDR to the first "
                                "node's name")
            hosts += [f"{name}{number:0{len(low)}d}" for number in range(int(low), int(high or low) + 1)]
    return hosts


def cleanup_distributed() -> None:
    global _WAITING_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _WAITING_GROUP = None


def exit_process(main) -> None:
    """`sys.exit(main())`, except that a process of a multi-process job leaves with os._exit once its
    output is flushed.

    gloo's worker threads can still hold tensors when Python shuts down; freeing one then needs the
    GIL, which the interpreter no longer hands out, and the process aborts ("terminate called without
    an active exception", exit -6) after a run that succeeded. Everything worth keeping is written and
    closed by then (checkpoints fsynced, TensorBoard closed), so skipping the interpreter's own
    shutdown loses nothing.
    """
    try:
        code = main()
    except SystemExit as e:  # a stopped run (128 + signal) or the launcher's exit
        code = e.code
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ and isinstance(code, int):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Only rank 0 writes logs, TensorBoard events, checkpoints and result files."""
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks in place (no-op in a single process) and return it.

    On the CPU (gloo) this returns only once gloo's worker thread has let go of the tensor: it
    drops its references a moment after the result is ready. Had the Python object gone first (a
    reduction just before the process exits), that thread would free it, which needs the GIL; during
    interpreter shutdown it cannot have it and the process aborts ("terminate called without an
    active exception"). The thread outlives destroy_process_group once DDP has used the group.
    """
    if get_world_size() > 1:
        held = tensor._use_count()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        deadline = time.monotonic() + RELEASE_WAIT_S
        while tensor.device.type == "cpu" and tensor._use_count() > held and time.monotonic() < deadline:
            time.sleep(0)  # gives up the GIL, which the worker thread may need
    return tensor


def barrier() -> None:
    """Every rank waits here for all the others, however long the slowest takes (up to WAIT_TIMEOUT): rank 0
    may be scanning 1.28 M files on a network file system or computing the dataset statistics meanwhile,
    for longer than the process group's timeout (NCCL's 10 minutes) allows a collective. A rank that dies
    still ends the wait at once (its connection closes)."""
    if get_world_size() > 1:
        dist.barrier(group=_waiting_group())


def _waiting_group():
    """The gloo group with a long timeout that `barrier` waits on (on the CPU whatever the backend: a wait
    needs no GPU), made by every rank together in init_distributed, or at the first barrier of a process
    group set up elsewhere."""
    global _WAITING_GROUP
    if _WAITING_GROUP is None:
        _WAITING_GROUP = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return _WAITING_GROUP


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first, the other ranks after it: a cache the block writes (the file lists on
    a shared file system) is written once, then read. Rank 0 lets the others go even if it fails; they
    then meet the same error themselves instead of waiting for it."""
    main = is_main_process()
    if not main:
        barrier()
    try:
        yield
    finally:
        if main:
            barrier()


def all_reduce_max(value: int) -> int:
    """The largest of every rank's `value` (the value itself in a single process)."""
    if get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank ([obj] in a single process)."""
    if get_world_size() == 1:
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from rank `src` to every rank (no-op in a single process). The others wait
    for `src` in `barrier` first: it may have computed the object for minutes (the dataset statistics)."""
    if get_world_size() == 1:
        return obj
    barrier()
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def usable_cpus() -> int:
    """The cores this process may run on: its affinity mask, as taskset, cpusets and SLURM set it."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_cpu_threads(device: str, workers: int) -> None:
    """On CPU runs, give torch's threads the cores the DataLoader workers leave free; log it as one line.

    torch starts one intra-op thread per core, and each DataLoader worker decodes on a core too: with
    2 workers on 2 cores the net's threads and the workers fight for the same cores (the CPU demo ran
    several times slower). A user's OMP_NUM_THREADS / MKL_NUM_THREADS wins (torchrun sets 1 for its processes).
    CUDA runs are left alone: there the net runs on the GPU.
    """
    if resolve_device(device) != "cpu":
        return
    setup_logging(int(os.environ.get("RANK", "0")))
    variable = _thread_variable()
    if variable:
        get_logger().info(f"CPU run: {torch.get_num_threads()} torch thread(s), as {variable}={os.environ[variable]} "
                          "in the environment says")
        return
    cpus = _cpu_share()
    threads = max(1, cpus - workers)
    torch.set_num_threads(threads)
    get_logger().info(f"CPU run: {threads} torch thread(s) = {cpus} usable core(s) - {workers} data-loading "
                      "worker(s) (set OMP_NUM_THREADS to choose)")


def _thread_variable() -> str | None:
    """The environment variable that sets torch's thread count, where the user (or torchrun) set one."""
    return next((var for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if os.environ.get(var)), None)


def _cpu_share() -> int:
    """The usable cores of this process's share (the ranks on one machine split them)."""
    return usable_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def batches_side_by_side(device: str) -> int:
    """How many batches the net may run at once, each on torch's current threads, once the DataLoader's
    workers idle (the loader spent): this process's share of the cores over its torch threads. 1 on a
    GPU, and where the environment sets the thread count (the user chose how many cores to use)."""
    if resolve_device(device) != "cpu" or _thread_variable():
        return 1
    return max(1, _cpu_share() // torch.get_num_threads())


def shard_indices(num_items: int, rank: int, world_size: int) -> list[int]:
    """This rank's share of range(num_items): every item on exactly one rank, no padded repeats.

    (DistributedSampler pads the last ranks with repeats to equal lengths; counting those would
    count some images twice, so evaluation shards with this instead.)
    """
    return list(range(rank, num_items, world_size))
