"""Run by test_distributed.py, alone or under torchrun: a few training steps on fixed data.

Rank 0 writes every rank's flattened parameters (gathered) to the path given as argv[1], so the test
can check that the ranks agree and that N processes match one process on the same global batch.
Every rank also writes the metrics it got back from train_one_epoch (per epoch) and validate to
`<argv[1]>.rank<r>.json`: reduced over ranks, they must equal one process's.
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader, Subset

from vgg.core.distributed import all_reduce_sum, cleanup_distributed, init_distributed, shard_indices
from vgg.data.batches.loaders import EpochSampler
from vgg.data.datasets.stats import IMAGENET_STATS
from vgg.models.vgg import build_vgg
from vgg.training.loop import train_one_epoch, validate
from vgg.training.step import BatchAugment

GLOBAL_BATCH, NUM_IMAGES, STEPS = 8, 32, 3
NUM_VAL_IMAGES, VAL_BATCH = 13, 3  # an odd count: the two ranks' shards differ in size


def collate(items):
    return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items]), []  # no unreadable files


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    torch.manual_seed(0)
    # Dropout off and no colour shift: their random draws are per rank by design, so only the
    # deterministic part of the step can be compared with a single process.
    model = build_vgg("A", num_classes=4, width=1 / 16, fc_width=32, image_size=32, dropout=0.0, init="xavier")
    net = torch.nn.parallel.DistributedDataParallel(model) if info.distributed else model
    data_gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (NUM_IMAGES, 3, 32, 32), dtype=torch.uint8, generator=data_gen)
    labels = torch.randint(0, 4, (NUM_IMAGES,), generator=data_gen)
    dataset = list(zip(images, labels.tolist()))
    sampler = EpochSampler(NUM_IMAGES, seed=0, rank=info.rank, world_size=info.world_size)
    loader = DataLoader(dataset, batch_size=GLOBAL_BATCH // info.world_size, sampler=sampler, collate_fn=collate)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    augment = BatchAugment(IMAGENET_STATS, info.device, color_shift_std=0.0)
    metrics = {"train": []}
    for epoch in range(2):
        sampler.set_epoch(epoch)
        train = train_one_epoch(net, loader, optimizer, augment, epoch=epoch, num_steps=STEPS, log_every=2)
        metrics["train"].append({k: train[k] for k in ("loss", "top1_err", "top5_err", "images", "step")})

    val_images = torch.randint(0, 256, (NUM_VAL_IMAGES, 3, 32, 32), dtype=torch.uint8, generator=data_gen)
    val_labels = torch.randint(0, 4, (NUM_VAL_IMAGES,), generator=data_gen)
    val_set = Subset(list(zip(val_images, val_labels.tolist())),
                     shard_indices(NUM_VAL_IMAGES, info.rank, info.world_size))
    val = validate(net, DataLoader(val_set, batch_size=VAL_BATCH, collate_fn=collate), augment, bf16=False)
    # all_reduce_sum returns once gloo has let go of the tensor (else its worker thread may be the one
    # to free a Python tensor during interpreter shutdown, and abort the process).
    counts = all_reduce_sum(torch.ones(3))
    assert counts.tolist() == [info.world_size] * 3 and counts._use_count() == 1
    metrics["val"] = {k: val[k] for k in ("loss", "top1", "top1_err", "top5_err", "images")}
    with open(f"{out_path}.rank{info.rank}.json", "w") as f:
        json.dump(metrics, f)

    params = parameters_to_vector(model.parameters()).detach()
    gathered = [torch.empty_like(params) for _ in range(info.world_size)]
    if info.distributed:
        dist.all_gather(gathered, params)
    else:
        gathered = [params]
    if info.rank == 0:
        torch.save(torch.stack(gathered), out_path)
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
