"""Test trained VGG nets the paper's ways (§3.2, §4) and print top-1/top-5 error like its tables.

    python evaluate.py --dense                         # newest checkpoints/*/best.pt, Q from its training S
    python evaluate.py --dense --single-scale          # Table 3: Q = S, or (S_min+S_max)/2 if jittered
    python evaluate.py --dense --multi-crop            # Table 5: dense, multi-crop, and the two averaged
    python evaluate.py --multi-crop --scales 256 384 512 --checkpoint checkpoints/D-jitter/best.pt
    python evaluate.py --dense --multi-crop --checkpoint checkpoints/D/best.pt checkpoints/E/best.pt  # Table 6
    python evaluate.py --dense --multi-crop --data /data/imagenet --gpus 4
    python evaluate.py --dense --multi-crop --weights torchvision:vgg16 --data /data/imagenet  # torchvision's
    python evaluate.py --dense --checkpoint ~/Downloads/vgg16-397923af.pth --data /data/imagenet    # the same file

Test scales Q (Table 4) by default follow how each net was trained: fixed S -> {S-32, S, S+32},
jittered [S_min, S_max] -> {S_min, (S_min+S_max)/2, S_max} (scales below the crop size are raised
to it). Several checkpoints are fused: their soft-max outputs averaged. The table is printed and
written as JSON (with per-class accuracy) and Markdown to <first checkpoint's folder>/eval/.
torchvision's VGG weights (a bare vgg11/13/16/19 state dict, or --weights) are tested at Q = {256, 384, 512}
with their own input normalisation (vgg/models/pretrained.py).
"""

import argparse
import time
from pathlib import Path

from vgg.config import MAX_PIXELS, RUNTIME_FIELDS, check_ranges, ensure_writable_dir, get_args_parser, runtime_value
from vgg.core.command import run_command
from vgg.core.distributed import exit_process, is_main_process
from vgg.core.errors import UserError, check_range
from vgg.core.progress import get_logger


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[get_args_parser(fields=RUNTIME_FIELDS)])
    parser.add_argument("--checkpoint", nargs="+", metavar="PATH",
                        help="checkpoint(s) or run folder(s); several are fused (default: the newest "
                             "checkpoints/*/best.pt)")
    parser.add_argument("--weights", nargs="+", metavar="NAME", default=[],
                        help="published weights to evaluate (fused with any --checkpoint): torchvision:vgg11, "
                             "torchvision:vgg13, torchvision:vgg16 or torchvision:vgg19 (IMAGENET1K_V1, through "
                             "torchvision's weights API and cache)")
    parser.add_argument("--dense", action="store_true", help="dense evaluation (§3.2); the default method")
    parser.add_argument("--multi-crop", action="store_true", help="5x5 grid of crops and flips per scale (§4.2)")
    scales = parser.add_mutually_exclusive_group()
    scales.add_argument("--scales", nargs="+", type=int, metavar="Q", help="test scales Q (default: from training S)")
    scales.add_argument("--single-scale", action="store_true",
                        help="Q = S, or (S_min+S_max)/2 for a scale-jittered net (Table 3)")
    parser.add_argument("--data", metavar="ROOT",
                        help="dataset root holding val/<wnid>/* (default: the first checkpoint's training data)")
    parser.add_argument("--out", metavar="PATH",
                        help="write PATH.json and PATH.md (default: <checkpoint folder>/eval/<time>)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch, per GPU (default: 32)")
    return parser


def prepare(args):
    """Everything that can fail on bad input, checked before any worker process starts."""
    from vgg.evaluation.inputs import open_val_set
    from vgg.evaluation.nets import default_checkpoint, load_eval_net

    check_ranges({name: getattr(args, name) for name in ("batch_size", "gpus", "workers", "progress_every_s")})
    for q in args.scales or ():
        check_range(q, 1, MAX_PIXELS, what="every Q of --scales")
    paths = (args.checkpoint or ([] if args.weights else [default_checkpoint()])) + args.weights
    nets = [load_eval_net(p, scales=args.scales, single_scale=args.single_scale) for p in paths]
    # The results' folder must be writable before an hour of evaluation, not after it.
    args.out = Path(args.out or nets[0].path.parent / "eval" / (time.strftime("%Y%m%d-%H%M%S") + "-" +
                                                                "-".join(methods_of(args))))
    ensure_writable_dir(args.out.parent, "--out")
    if args.data:
        val_dir = Path(args.data) / "val"
    else:
        data = nets[0].config.get("data")
        if not data:
            raise UserError(f"{nets[0].path} does not record its dataset: pass --data ROOT")
        val_dir = Path(data) / "val"
    open_val_set(nets, val_dir)
    return nets, val_dir


def methods_of(args) -> list[str]:
    """The methods asked for, in the paper's order; dense when none is given."""
    return [m for m, on in (("dense", args.dense), ("multi-crop", args.multi_crop)) if on] or ["dense"]


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    for name in RUNTIME_FIELDS:  # flags not given take the Config defaults
        setattr(args, name, runtime_value(args, name))
    return run_command(args, prepare, run, f"lower --batch-size (now {args.batch_size}) or the test scales "
                                            "(--scales, --single-scale)")


def run(args, nets, val_dir, dist) -> None:
    from vgg.evaluation.report import format_report, write_results, write_tensorboard
    from vgg.evaluation.runner import evaluate_dataset

    result = evaluate_dataset(nets, val_dir, methods=methods_of(args), device=dist.device, batch_size=args.batch_size,
                              workers=args.workers, bf16=args.bf16, channels_last=args.channels_last,
                              rank=dist.rank, world_size=dist.world_size, progress=is_main_process(),
                              progress_every_s=args.progress_every_s)
    if not is_main_process():
        return
    json_path, md_path = write_results(result, args.out)
    print(format_report(result))
    print(f"results: {json_path}, {md_path}")
    try:
        folder = write_tensorboard(result, nets[0], Path(args.out).name)
        get_logger().info(f"TensorBoard: an evaluation section in {folder} (tensorboard --logdir {folder.parent})")
    except OSError as e:  # the results are written already; the dashboard copy is a convenience
        get_logger().warning(f"warning: no TensorBoard evaluation section: {e}")


if __name__ == "__main__":
    exit_process(main)
