"""A run's parts built from its config (§3.1): the data and its statistics, the training loader, the net,
its optimizer and schedule, and the net a fresh run starts from.
"""

from pathlib import Path

import torch

from vgg.config import Config
from vgg.core.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    is_main_process,
    main_process_first,
    shard_indices,
    wrap_ddp,
)
from vgg.core.errors import UserError
from vgg.core.progress import get_logger
from vgg.data.batches import loaders as vloaders
from vgg.data.batches.loaders import EpochSampler
from vgg.data.batches.transforms import CenterCropTransform, TrainTransform
from vgg.data.datasets import folders as vfolders
from vgg.data.datasets import sample as vsample
from vgg.data.datasets import shards as vshards
from vgg.data.datasets import stats as vstats
from vgg.data.datasets.prepare import check_class_order
from vgg.models.checkpoint import load_net_checkpoint
from vgg.models.zoo import build_net
from vgg.training.parts import Net, RunData, Speed
from vgg.training.recipe import build_optimizer

log = get_logger()


def prepare_dataset(config: Config) -> Path:
    """The dataset root; the sample dataset and the digits set are generated on first use (rank 0 only)."""
    root = Path(config.data)
    if vshards.is_shard_dir(root):  # WebDataset shards: streamed (vgg/data/datasets/shards.py)
        return root
    generated = {Path(vsample.DEFAULT_ROOT).resolve(): vsample.make_sample_dataset,
                 Path(vsample.DIGITS_ROOT).resolve(): vsample.make_digits_dataset}
    if root.resolve() in generated:
        if is_main_process():
            generated[root.resolve()](root)
        barrier()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"data folder {root / split} not found: --data must hold train/<wnid>/*.JPEG "
                            "and val/<wnid>/*.JPEG (see data/README.md)")
    return root


def load_stats(config: Config, train_dir: Path) -> vstats.DatasetStats:
    """Mean RGB and colour PCA (§2.1; AlexNet §4.1): computed once and cached, or supplied."""
    if config.stats == "imagenet":
        return vstats.IMAGENET_STATS
    if config.stats != "auto":
        path = Path(config.stats)
        if not path.is_file():
            raise UserError(f"stats file not found: {path} (use --stats auto or imagenet)")
        return vstats.read_stats_file(path)
    stats = None
    if is_main_process():
        shards = vshards.is_shard_dir(train_dir.parent)
        compute = vshards.load_or_compute_stats if shards else vstats.load_or_compute_stats
        stats = compute(train_dir, num_images=config.stats_images, seed=config.seed,
                        progress_every_s=config.progress_every_s)
    return broadcast_object(stats)


def read_init_checkpoint(config: Config) -> dict | None:
    """The net a fresh run starts from (§3.1: deeper nets from net A, S=384 from S=256, jittered from S=384)."""
    if not config.init_from:
        return None
    if not Path(config.init_from).is_file():
        raise UserError(f"--init-from {config.init_from} not found: net {config.arch} starts from a trained "
                        "net (§3.1: deeper nets from net A, S=384 from S=256, jittered from S=384); train "
                        "that first, or pass --init-from PATH, or --init-from '' to start from scratch")
    return load_net_checkpoint(config.init_from)


def build_data(config: Config, ckpt: dict | None, dist: DistInfo) -> RunData:
    """Data (§3.1): the statistics (a resume keeps its own), both splits, this rank's order and batches."""
    per_rank_batch = config.batch_size // dist.world_size
    root = prepare_dataset(config)
    stats = vstats.DatasetStats.from_dict(ckpt["stats"]) if ckpt else load_stats(config, root / "train")
    if vshards.is_shard_dir(root):
        train_set, val_set = vshards.open_training_sets(config, rank=dist.rank, world_size=dist.world_size,
                                                        per_rank_batch=per_rank_batch)
    else:
        with main_process_first():  # rank 0 scans and caches the file lists; the other ranks read its cache
            train_set = vfolders.ImageFolder(root / "train", TrainTransform(
                crop_size=config.crop_size, scale_min=config.scale_min, scale_max=config.scale_max, seed=config.seed))
            val_set = vfolders.ImageFolder(root / "val", CenterCropTransform(scale=config.test_scale,
                                                                             crop_size=config.crop_size))
    check_class_order(train_set.classes, root / "train", warn=True)  # 1000 classes: index 0 must be n01440764
    if val_set.classes != train_set.classes:
        raise UserError(f"{root / 'val'} has {len(val_set.classes)} classes, {root / 'train'} has "
                        f"{len(train_set.classes)}: the class folders must be the same")
    vfolders.require_a_readable_image(val_set, getattr(val_set, "root", f"the validation shards of {root}"))
    if not vshards.is_shard_dir(root):  # (a shard stream is read in order: its epochs refuse a set read in vain)
        vfolders.require_a_readable_image(train_set, root / "train")  # trained on nothing: loss nan, "done"
    train_files = train_set.fingerprint()
    check_training_set(ckpt, train_files)
    sampler = EpochSampler(len(train_set), seed=config.seed, rank=dist.rank, world_size=dist.world_size)
    steps_per_epoch = sampler.per_rank() // per_rank_batch
    if isinstance(train_set, vshards.ShardStream):  # every image once an epoch, the same steps on every rank
        steps_per_epoch = train_set.num_steps
    if config.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
    if steps_per_epoch == 0:
        raise UserError(f"{len(train_set)} training images make no full batch of {per_rank_batch} per process")
    val_loader = vloaders.build_loader(
        torch.utils.data.Subset(val_set, shard_indices(len(val_set), dist.rank, dist.world_size)),
        batch_size=per_rank_batch, shuffle=False, workers=config.workers,
        collate_fn=vloaders.collate_batch, seed=config.seed)
    return RunData(stats, train_set, val_set, val_loader, sampler, per_rank_batch, steps_per_epoch, train_files)


def check_training_set(ckpt: dict | None, files: dict) -> None:
    """A mid-epoch resume deals the rest of the epoch's order, which was built from the training file
    list: with files added, removed or renamed since, some images would be trained twice and others
    not at all, so it is refused; at an epoch boundary the run goes on, with one line (issue 29)."""
    saved = ckpt.get("train_files") if ckpt else None
    if not isinstance(saved, dict) or saved == files:  # older checkpoints do not record it
        return
    what = (f"{saved.get('count')} training files then, {files['count']} now" if saved.get("count") != files["count"]
            else f"{files['count']} training files then and now, a different list")
    if ckpt["step"]:
        raise UserError(f"the training set changed since the checkpoint of epoch {ckpt['epoch']} step {ckpt['step']} "
                        f"({what}): the rest of that epoch would train some images twice and skip others; put the "
                        "files back, or resume from a checkpoint saved at an epoch's end")
    log.info(f"the training set changed since the checkpoint ({what}): epoch {ckpt['epoch']} on is dealt from the new list")


def build_train_loader(config: Config, train_set, sampler, batch_size: int, device: torch.device, *, seed: int):
    """uint8 training crops, decoded and augmented by CPU workers (default) or on the GPU (TorchCodec).

    Built once for the run, iterated once an epoch after `sampler.set_epoch(epoch, start)`. Either way
    each sample's draws come from sample_generator(config.seed, epoch, index) (bit-exact whatever the
    workers, processes or resume point); `seed` only seeds the loader's own generator. The CPU
    workers persist across epochs with the dataset copy they started with, so each index brings its
    epoch along (EpochTagged); the GPU loader is told it by `set_epoch`.
    """
    if config.data_path == "gpu":
        from vgg.data.batches.gpu import build_gpu_train_loader  # needs TorchCodec; only imported when asked for

        return build_gpu_train_loader(train_set, batch_size=batch_size, device=device, crop_size=config.crop_size,
                                      scale_min=config.scale_min, scale_max=config.scale_max, seed=config.seed,
                                      epoch=sampler.epoch, workers=config.workers, sampler=sampler, drop_last=True)
    return vloaders.build_loader(train_set, batch_size=batch_size, sampler=vloaders.EpochTagged(sampler),
                              workers=config.workers, collate_fn=vloaders.collate_batch, seed=seed, drop_last=True)


def build_net_and_optimizer(config: Config, data: RunData, speed: Speed, dist: DistInfo) -> Net:
    """The net (Table 1) with N(0, 0.01^2) or Glorot init (§3.1), SGD and the plateau schedule."""
    torch.manual_seed(config.seed)
    model = build_net(config.arch, num_classes=len(data.classes), width=config.width, fc_width=config.fc_width,
                      image_size=config.crop_size, dropout=config.dropout, init=config.init)
    # On the device before the optimizer exists: its loaded state (momentum) follows the parameters.
    model.to(dist.device)
    if speed.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=config.lr_factor, patience=config.patience)
    return Net(model, model, optimizer, scheduler)


def wrap_for_speed(model: torch.nn.Module, speed: Speed, dist: DistInfo) -> torch.nn.Module:
    if dist.distributed:
        model = wrap_ddp(model, dist)
    return torch.compile(model) if speed.compile else model
