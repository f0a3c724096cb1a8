"""What the data streams carry (issue 37): every epoch's draws are that epoch's and follow the image, on the
CPU path's persistent workers and on the GPU path (run here on CPU tensors) with an unreadable file in the
batch; shard streams make the same full steps as the class folders whatever the worker count, each epoch
with that epoch's draws; the statistics' sample follows --seed and --stats-images, for shards too. Real
JPEGs, shards, DataLoader workers and the run's own loader builders."""

import json

import pytest
import torch
from test_shards import small_folders

from vgg.config import Config
from vgg.data.batches.gpu import build_gpu_train_loader
from vgg.data.batches.loaders import EpochSampler
from vgg.data.batches.transforms import EvalTransform, TrainTransform
from vgg.data.datasets import shards as vshards
from vgg.data.datasets import stats as vstats
from vgg.data.datasets.folders import ImageFolder
from vgg.training.run import build_train_loader, load_stats

SEED, CROP, S_MIN, S_MAX = 5, 32, 36, 48
CLASSES = {"n00000001": 7, "n00000004": 6, "n00000006": 6, "n00000009": 6}  # 25 readable training images


@pytest.fixture(scope="module")
def folders(sample_root, tmp_path_factory):
    return small_folders(sample_root, tmp_path_factory.mktemp("streams") / "folders", CLASSES)


@pytest.fixture(scope="module")
def wds(folders):
    vshards.write_shards(folders, folders.parent / "wds", images_per_shard=10)  # shards of 10, 10 and 5
    return folders.parent / "wds"


def reference_draws(train: ImageFolder, epoch: int, index: int):
    """The CPU path's crop and alphas of an image, drawn in this process."""
    transform = TrainTransform(crop_size=CROP, scale_min=S_MIN, scale_max=S_MAX, seed=SEED)
    transform.set_epoch(epoch)
    return transform(train.path(index), index)


def test_the_cpu_paths_persistent_workers_draw_each_epochs_crops(folders):
    """The run's loader (two persistent workers, started in epoch 0) gives each image of epoch 1 the crop and
    alphas of (seed, 1, index), not those of epoch 0 again."""
    train = ImageFolder(folders / "train", TrainTransform(crop_size=CROP, scale_min=S_MIN, scale_max=S_MAX,
                                                          seed=SEED))
    sampler = EpochSampler(len(train), seed=SEED, rank=0, world_size=1)
    loader = build_train_loader(Config(workers=2, seed=SEED), train, sampler, 8, torch.device("cpu"), seed=SEED)
    pids, draws = [], []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = list(sampler)
        batches = list(loader)
        pids.append({w.pid for w in loader._iterator._workers})
        images = torch.cat([crops.image for crops, _, _ in batches])
        alphas = torch.cat([crops.alphas for crops, _, _ in batches])
        draws.append({index: (images[k], alphas[k]) for k, index in enumerate(order[:len(images)])})
        for index, (image, alpha) in draws[-1].items():
            expected = reference_draws(train, epoch, index)
            assert torch.equal(image, expected.image) and torch.equal(alpha, expected.alphas), (epoch, index)
    assert pids[0] == pids[1] and len(pids[0]) == 2  # the same workers both epochs
    for index in draws[0].keys() & draws[1].keys():
        assert not torch.equal(draws[0][index][1], draws[1][index][1]), index


def test_the_gpu_paths_draws_follow_each_kept_image_past_an_unreadable_one(folders, tmp_path):
    """A batch whose first file is unreadable: each kept image gets the alphas of its own (seed, epoch,
    index), the CPU path's, not those of its place among the kept ones."""
    train = ImageFolder(folders / "train")
    empty = tmp_path / "empty.JPEG"
    empty.write_bytes(b"")
    samples = [(str(empty), 0)] + [(train.path(i), int(train.labels[i])) for i in range(5)]
    order = [0, 3, 1, 5, 2, 4]
    loader = build_gpu_train_loader(samples, batch_size=len(order), device="cpu", crop_size=CROP, scale_min=S_MIN,
                                    scale_max=S_MAX, seed=SEED, epoch=2, workers=0, sampler=order, prefetch=False)
    (crops, labels, unreadable), = list(loader)
    assert [f.path for f in unreadable] == [str(empty)] and len(labels) == 5
    cpu_path = TrainTransform(crop_size=CROP, scale_min=S_MIN, scale_max=S_MAX, seed=SEED)
    cpu_path.set_epoch(2)
    for k, index in enumerate(order[1:]):  # the same file at the same index on the CPU path
        assert torch.equal(crops.alphas[k], cpu_path(samples[index][0], index).alphas), index
        assert labels[k] == samples[index][1]


def stream_batches(stream: vshards.ShardStream, epoch: int) -> list[torch.Tensor]:
    return [images for images, labels, _ in stream.loader(epoch=epoch)]


class IndexAndEpoch:
    """Stands in for TrainTransform in a stream: the sample's index and the epoch its worker's copy was told."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, data, index: int, check=None) -> torch.Tensor:  # (TrainTransform's signature)
        return torch.tensor([index, self.epoch])


@pytest.mark.parametrize("world_size,batch_size", [(1, 5), (2, 6), (3, 4)])
def test_a_shard_stream_makes_the_class_folders_full_steps_whatever_the_workers(wds, world_size, batch_size):
    """As many steps as the class folders' loader makes (EpochSampler, full batches), each a full batch on
    every rank, whatever the number of workers; no image twice in an epoch (all 25 when they fill whole
    batches); each epoch's draws are that epoch's, in the workers too."""
    split = vshards.open_split(wds, "train")
    folder_steps = EpochSampler(25, seed=SEED, rank=0, world_size=world_size).per_rank() // batch_size
    seen = {}
    for workers in (0, 2):
        streams = [vshards.ShardStream(split, IndexAndEpoch(), batch_size=batch_size, workers=workers, seed=SEED,
                                       rank=r, world_size=world_size, shuffle_buffer=4) for r in range(world_size)]
        assert streams[0].num_steps == folder_steps, workers
        for epoch in (0, 1):
            per_rank = [stream_batches(s, epoch) for s in streams]
            assert all(len(batches) == folder_steps for batches in per_rank), (workers, epoch)
            assert all(len(b) == batch_size for batches in per_rank for b in batches), (workers, epoch)
            samples = torch.cat([b for batches in per_rank for b in batches])
            assert (samples[:, 1] == epoch).all(), (workers, epoch)
            indices = samples[:, 0].tolist()
            assert len(set(indices)) == len(indices) == folder_steps * batch_size * world_size
            seen[workers, epoch] = set(indices)
    if 25 % (world_size * batch_size) == 0:
        assert all(indices == set(range(25)) for indices in seen.values())


def test_the_statistics_sample_follows_the_seed_and_the_image_count(folders, wds):
    """Class folders: the same --seed samples the same images, another seed others, and --stats-images of
    them are read. Shards: the first --stats-images images of the training split, through the run's
    load_stats."""
    train = folders / "train"

    def stats(seed: int, count: int = 12):
        result, used, skipped = vstats.compute_stats(train, num_images=count, seed=seed, workers=0)
        assert used + skipped == count
        return result

    assert stats(1) == stats(1) and stats(1) != stats(2) and stats(1) != stats(1, 13)
    for count in (7, 9):
        got = load_stats(Config(data=str(wds), stats="auto", stats_images=count, seed=SEED), wds / "train")
        first = torch.utils.data.Subset(
            vshards.ShardImages(vshards.open_split(wds, "train"), EvalTransform(scale=vstats.STATS_SIDE)), range(count))
        expected = vstats.stats_of_images(first, where="the first images", workers=0)[0]
        assert got == expected, count
        cache = json.loads((wds / vstats.stats_cache_name(count, SEED)).read_text())
        assert cache["num_images"] == count
