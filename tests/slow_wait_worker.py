"""Run by test_hardening_round4_launch.py as two processes (RANK 0 and 1): rank 0's scan of the class
folders and its dataset statistics each take SLOW_S seconds, longer than the process group's timeout
(PG_TIMEOUT_S), as ImageNet's 1.28 M files on a network file system take longer than NCCL's 10 minutes.
The other rank waits in vgg.core.distributed's barrier and broadcast_object meanwhile.

    python tests/slow_wait_worker.py ROOT OUT PG_TIMEOUT_S SLOW_S
"""

import datetime
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from vgg.core import distributed as vdist
from vgg.data.datasets import folders as vfolders


def main(root: str, out: str, pg_timeout_s: float, slow_s: float) -> None:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # The store waits (long) until both processes are up; the process group's collectives time out after
    # pg_timeout_s, as NCCL's do after 10 minutes.
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, rank == 0,
                          timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=pg_timeout_s))
    vdist.init_distributed("cpu")
    if rank == 0:  # Test fault injection: a slow file system under rank 0's scan.
        list_files = vfolders.list_files
        vfolders.list_files = lambda split_dir: (time.sleep(slow_s), list_files(split_dir))[1]
    with vdist.main_process_first():  # as vgg.training.run.build_data scans the training set
        images = len(vfolders.ImageFolder(Path(root) / "train"))
    stats = vdist.broadcast_object((time.sleep(slow_s), images)[1] if rank == 0 else None)  # as load_stats
    total = vdist.all_reduce_sum(torch.tensor([images]))
    Path(f"{out}.rank{rank}").write_text(f"{images} {stats} {int(total)}")
    vdist.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
