"""`python -m vgg.data`: the data commands.

    python -m vgg.data sort-val --val-dir VAL --labels LABELS      # the flat official val folder -> <wnid>/
    python -m vgg.data prepare --from devkit|kaggle|hf SRC DEST     # ImageNet as people get it -> class folders
    python -m vgg.data shards SRC DEST                              # class folders -> WebDataset shards
    python -m vgg.data stats --train-dir TRAIN                      # mean RGB and colour PCA (cached)
    python -m vgg.data sample [--out data/sample] [--digits]        # the generated sample sets

(`python -m vgg.sample_data` is `python -m vgg.data sample`.)
"""

import argparse
import json
import logging
import sys

from vgg.core.errors import MAX_SEED, UserError, check_ranges_in
from vgg.data.datasets import sample as vsample
from vgg.data.datasets.labels import sort_val
from vgg.data.datasets.prepare import prepare
from vgg.data.datasets.shard_writer import write_shards
from vgg.data.datasets.stats import load_or_compute_stats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vgg.data", description="ImageNet data utilities")
    commands = parser.add_subparsers(dest="command", required=True)
    sort = commands.add_parser("sort-val", help="sort the flat official val folder into <wnid>/ folders")
    sort.add_argument("--val-dir", required=True, help="the folder of ILSVRC2012_val_*.JPEG files")
    sort.add_argument("--labels", required=True,
                      help="'<filename> <wnid>' per line, or the devkit's ILSVRC2012_validation_ground_truth.txt")
    sort.add_argument("--devkit-classes", default=None,
                      help="for the devkit's ground truth: data/meta.mat, or a file of wnids in ILSVRC2012_ID order")
    prepare = commands.add_parser("prepare", help="write the class-folder layout from an ImageNet download "
                                  "(links where possible; re-runnable)")
    prepare.add_argument("--from", dest="source", required=True, choices=("devkit", "kaggle", "hf"),
                         help="devkit: image-net.org's ILSVRC2012 archives or folders; kaggle: "
                              "imagenet-object-localization-challenge; hf: ILSVRC/imagenet-1k tarballs")
    prepare.add_argument("src", help="the downloaded source folder")
    prepare.add_argument("dest", help="the dataset root to write (train/<wnid>/, val/<wnid>/)")
    prepare.add_argument("--copy", action="store_true", help="copy files instead of linking them")
    shards = commands.add_parser("shards", help="write WebDataset shards (timm/imagenet-1k-wds layout) "
                                 "from class folders")
    shards.add_argument("src", help="a dataset root holding train/<wnid>/ and val/<wnid>/")
    shards.add_argument("dest", help="the folder to write imagenet1k-{train,validation}-*.tar and _info.json to")
    shards.add_argument("--images-per-shard", type=int, default=1252,
                        help="images per shard (1252: ImageNet's train split in 1024 shards)")
    shards.add_argument("--seed", type=int, default=0, help="the shuffle of the training images over the shards")
    stats = commands.add_parser("stats", help="compute (or show the cached) dataset statistics")
    stats.add_argument("--train-dir", required=True, help="the train/ folder")
    stats.add_argument("--num-images", type=int, default=10000, help="training images to sample")
    stats.add_argument("--seed", type=int, default=0)
    sample = commands.add_parser("sample", help="generate the sample dataset (or the digits set) from "
                                 "scikit-image's photographs")
    sample.add_argument("--out", default=str(vsample.DEFAULT_ROOT), help="dataset root to write (default: %(default)s)")
    sample.add_argument("--seed", type=int, default=0, help="generator seed (default: %(default)s)")
    sample.add_argument("--digits", action="store_true",
                        help=f"the digits-like set of configs/lenet5-demo.yaml instead (default --out {vsample.DIGITS_ROOT})")
    return parser


# The numeric options' ranges (UserError naming the flag, as train.py's): (low, high).
RANGES = {"images_per_shard": (1, 10**6), "num_images": (1, 10**7), "seed": (0, MAX_SEED)}


def run_command(args: argparse.Namespace) -> None:
    """One command, its one-line summary printed; UserError on bad input."""
    check_ranges_in({name: getattr(args, name, None) for name in RANGES}, RANGES)
    if args.command == "sort-val":
        counts = sort_val(args.val_dir, args.labels, args.devkit_classes)
        print(f"moved {counts['moved']} images into {counts['classes']} class folders under {args.val_dir} "
              f"({counts['already_sorted']} were already sorted, {counts['unlabelled']} unlabelled files left)")
    elif args.command == "prepare":
        counts = prepare(args.source, args.src, args.dest, copy=args.copy)
        done = ", ".join(f"{counts[k]} {k}" for k in ("linked", "symlinked", "copied", "extracted", "present",
                                                      "renamed") if counts.get(k))
        print(f"{args.dest}: {counts['classes']} classes, {counts['train']} train and {counts['val']} val "
              f"images ({done or 'nothing to do'})")
    elif args.command == "shards":
        info = write_shards(args.src, args.dest, images_per_shard=args.images_per_shard, seed=args.seed)
        print(f"{args.dest}: " + ", ".join(f"{split} {s['num_samples']} images in {len(s['filenames'])} shards"
                                           for split, s in info["splits"].items()))
    elif args.command == "sample":
        make_sample(args)
    else:
        print(json.dumps(load_or_compute_stats(args.train_dir, num_images=args.num_images,
                                               seed=args.seed).to_dict(), indent=2))


def make_sample(args: argparse.Namespace) -> None:
    if args.digits:
        root = vsample.make_digits_dataset(vsample.DIGITS_ROOT if args.out == str(vsample.DEFAULT_ROOT) else args.out,
                                           seed=args.seed)
    else:
        root = vsample.make_sample_dataset(args.out, seed=args.seed)
    files = [p for p in root.rglob("*.JPEG")]
    size = sum(p.stat().st_size for p in files)
    classes = len([p for p in (root / "train").iterdir() if p.is_dir()])
    print(f"{'digits' if args.digits else 'sample'} dataset in {root}: {classes} classes, {len(files)} files, "
          f"{size / 2**20:.1f} MiB")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run_command(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
