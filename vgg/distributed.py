"""Everything distributed lives here: process-group setup, rank-aware logging, reductions, launching.

One GPU or many use the same code. `--gpus N` (N > 1) re-executes the script under torchrun on this
machine; several machines run it under torchrun directly. Either way the script finds torchrun's
RANK / WORLD_SIZE / LOCAL_RANK in its environment and `init_distributed` joins the process group:
NCCL on CUDA, gloo on CPU (so tests can run two processes on a machine without a GPU).
"""

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vgg.errors import UserError

RELEASE_WAIT_S = 10.0  # all_reduce_sum: at most this long for gloo to release a tensor (microseconds normally)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group if torchrun started us; pick this process's device.

    device: "auto" (CUDA if available, else CPU), "cuda" or "cpu".
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU (use --device cpu)")
    if device not in ("cuda", "cpu"):
        raise UserError(f"unknown device {device!r}: choose auto, cuda or cpu")

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
    setup_logging(rank)
    return DistInfo(rank, world_size, local_rank, torch_device, distributed)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
    if get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from rank `src` to every rank (no-op in a single process)."""
    if get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def get_logger() -> logging.Logger:
    return logging.getLogger("vgg")


def setup_logging(rank: int) -> None:
    """Rank 0 logs INFO and up; other ranks only WARNING and up, tagged with their rank."""
    logger = get_logger()
    if logger.handlers:
        logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        return
    handler = logging.StreamHandler(sys.stderr)
    prefix = "" if rank == 0 else f"[rank {rank}] "
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False


def launch_if_needed(gpus: int) -> None:
    """With --gpus N > 1 and not already under torchrun: re-run this script as N processes, then exit.

    The child processes see RANK/WORLD_SIZE/LOCAL_RANK and take the normal path through
    `init_distributed`. Single-machine only; for several machines run torchrun yourself.
    """
    if gpus <= 1 or "RANK" in os.environ:
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={gpus}", sys.argv[0], *sys.argv[1:]]
    sys.exit(subprocess.call(cmd))


def shard_indices(num_items: int, rank: int, world_size: int) -> list[int]:
    """This rank's share of range(num_items): every item on exactly one rank, no padded repeats.

    (DistributedSampler pads the last ranks with repeats to equal lengths; counting those would
    count some images twice, so evaluation shards with this instead.)
    """
    return list(range(rank, num_items, world_size))
