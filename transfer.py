"""The paper's Appendix B: a net trained on ImageNet as the image descriptor of other datasets, with a linear
SVM, beside the paper's Table 11.

    python transfer.py --checkpoint checkpoints/D/best.pt --data /data/VOCdevkit/VOC2007
    python transfer.py --checkpoint checkpoints/D/best.pt --checkpoint checkpoints/E/best.pt --data /data/101_ObjectCategories
    python transfer.py --weights torchvision:vgg16 torchvision:vgg19 --data /data/256_ObjectCategories --gpus 4
    python transfer.py --checkpoint checkpoints/demo/best.pt --data data/transfer/caltech --scales 32,48 \\
        --train-per-class 6 --test-per-class 4                    # the CPU demo (python -m vgg.transfer.sample)

Descriptor (Appendix B): the net's last layer dropped, the penultimate layer's activations computed densely
over the image rescaled to smallest side Q, averaged over space and with the mirrored image's; over the
scales Q averaged or stacked, L2-normalised; several nets stacked. They are cached (--cache), so another
--combine, --svm-c or --splits costs no forward pass, and a stopped extraction goes on where it stopped.
Layouts: <root>/train|test/<class>/* ; VOC as distributed (VOC2007, VOC2012) ; Caltech-101/256 as
distributed. The table, per-class figures, JSON, Markdown and TensorBoard text go to the run folder (--out).
"""

import argparse
import time
from pathlib import Path

from vgg.config import MAX_PIXELS, RUNTIME_FIELDS, check_ranges, ensure_writable_dir, get_args_parser, runtime_value, speed_flag
from vgg.core.command import run_command
from vgg.core.distributed import barrier, exit_process, is_main_process
from vgg.core.errors import MAX_SEED, UserError, check_range, check_ranges_in
from vgg.core.progress import get_logger

# This command's own numeric options' ranges (the runtime ones are the Config's): (low, high).
RANGES = {"splits": (1, 1000), "seed": (0, MAX_SEED), "cv_folds": (2, 100), "voc_year": (2005, 2012),
          "train_per_class": (1, 100_000), "test_per_class": (1, 100_000)}

def number_list(kind):
    def parse(text: str) -> list:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    return parse


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[get_args_parser(fields=RUNTIME_FIELDS)])
    parser.add_argument("--checkpoint", action="extend", nargs="+", default=[], metavar="PATH",
                        help="a VGG checkpoint or run folder; repeat for several nets (descriptors stacked)")
    parser.add_argument("--weights", action="extend", nargs="+", default=[], metavar="NAME",
                        help="torchvision's published weights: torchvision:vgg11|vgg13|vgg16|vgg19")
    parser.add_argument("--data", required=True, metavar="ROOT", help="the dataset (see the layouts above)")
    parser.add_argument("--layout", default="auto", choices=("auto", "folders", "voc", "caltech"),
                        help="the dataset's layout (default: found from its folders)")
    parser.add_argument("--scales", type=number_list(int), default=[256, 384, 512], metavar="Q,Q,...",
                        help="test scales Q, the smallest image side (default: 256,384,512, the paper's)")
    parser.add_argument("--combine", choices=("average", "stack"),
                        help="scales averaged or stacked (default: as the paper, average on VOC, stack otherwise)")
    parser.add_argument("--splits", type=int, default=3, help="Caltech: random splits (default: 3, the paper's)")
    parser.add_argument("--seed", type=int, default=0, help="Caltech splits and cross-validation folds (default: 0)")
    parser.add_argument("--train-per-class", type=int, metavar="N",
                        help="Caltech: training images a class (default: 30 on Caltech-101, 60 on Caltech-256)")
    parser.add_argument("--test-per-class", type=int, metavar="N",
                        help="Caltech: test images a class at most (default: 50 on Caltech-101, the rest on -256)")
    parser.add_argument("--voc-year", type=int, metavar="YEAR", help="VOC: the year (default: from the folder name)")
    parser.add_argument("--svm-c", type=number_list(float), default=[0.01, 0.1, 1.0, 10.0], metavar="C,C,...",
                        help="the SVM's C values cross-validated (default: 0.01,0.1,1,10)")
    parser.add_argument("--cv-folds", type=int, default=5, help="cross-validation folds for C (default: 5)")
    parser.add_argument("--cache", default="checkpoints/transfer/features", metavar="DIR",
                        help="the descriptors' cache (default: checkpoints/transfer/features)")
    parser.add_argument("--out", metavar="DIR", help="the run folder (default: checkpoints/transfer/<data>-<time>)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch, per GPU (default: 32)")
    return parser


def prepare(args):
    """Everything that can fail on bad input, checked before any worker process starts."""
    from vgg.transfer.datasets import open_transfer_set
    from vgg.transfer.features import load_feature_net

    check_ranges({name: getattr(args, name) for name in ("batch_size", "gpus", "workers", "progress_every_s")})
    if not args.scales or not args.svm_c:
        raise UserError("--scales and --svm-c need a value at least")
    for q in args.scales:
        check_range(q, 1, MAX_PIXELS, what="every Q of --scales")
    for c in args.svm_c:
        check_range(c, 0, 1e6, low_open=True, what="every C of --svm-c")
    check_ranges_in({name: getattr(args, name) for name in RANGES}, RANGES)
    if not args.checkpoint and not args.weights:
        raise UserError("no net: pass --checkpoint PATH (repeatable) or --weights torchvision:vgg16")
    tset = open_transfer_set(args.data, args.layout, splits=args.splits, seed=args.seed,
                             train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                             voc_year=args.voc_year)
    fnets = [load_feature_net(spec, sorted(set(args.scales))) for spec in args.checkpoint + args.weights]
    args.combine = args.combine or ("average" if tset.multilabel else "stack")
    args.cache = ensure_writable_dir(args.cache, "--cache")
    args.out = Path(args.out or Path("checkpoints/transfer") / f"{Path(args.data).resolve().name}-"
                                                               f"{time.strftime('%Y%m%d-%H%M%S')}")
    ensure_writable_dir(args.out.parent, "--out")  # the folder itself only on rank 0 (its name has the time)
    return tset, fnets


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    for name in RUNTIME_FIELDS:  # flags not given take the Config defaults
        setattr(args, name, runtime_value(args, name))
    return run_command(args, prepare, run, f"lower --batch-size (now {args.batch_size}) or the scales (--scales)")


def run(args, tset, fnets, dist) -> None:
    from vgg.transfer.features import Extraction, extract
    from vgg.transfer.protocol import classify
    from vgg.transfer.report import dataset_name, format_report, measure_name, write_results, write_tensorboard

    how = Extraction(device=dist.device, batch_size=args.batch_size, workers=args.workers, bf16=args.bf16,
                     channels_last=args.channels_last, rank=dist.rank, world_size=dist.world_size,
                     progress=is_main_process(), progress_every_s=args.progress_every_s)
    counts = extract(fnets, tset.root, tset.images, args.cache, how)
    barrier()  # every rank's chunks are written
    if not is_main_process():
        return
    found = classify(tset, fnets, args.cache, bf16=speed_flag(args.bf16, dist.device), combine=args.combine,
                     grid=args.svm_c, folds=args.cv_folds, seed=args.seed)
    notes = tset.notes + ([f"{len(found['left_out'])} unreadable image(s) left out"] if found["left_out"] else [])
    result = {"data": str(args.data), "kind": tset.kind, "dataset": dataset_name(tset.kind, tset.root),
              "measure": measure_name(tset.multilabel), "multilabel": tset.multilabel, "classes": tset.classes,
              "images": len(tset.images), "notes": notes, "features": counts, "world_size": dist.world_size,
              "nets": [{"name": f.name, "checkpoint": str(f.net.path), "key": f.key} for f in fnets],
              "left_out": found["left_out"], "rows": found["rows"]}
    paths = write_results(result, args.out)
    print(format_report(result))
    print(f"results: {', '.join(str(p) for p in paths)}")
    try:
        folder = write_tensorboard(result, args.out)
        get_logger().info(f"TensorBoard: tensorboard --logdir {folder}")
    except OSError as e:  # the results are written already
        get_logger().warning(f"warning: no TensorBoard text: {e}")


if __name__ == "__main__":
    exit_process(main)
