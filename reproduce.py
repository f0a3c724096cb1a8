"""The whole paper in one command: train nets A-E as in §3.1, evaluate them as in §4, report Tables 3-6.

    python reproduce.py --data /data/imagenet --gpus 4       # the paper's twelve runs, then Tables 3-6
    python reproduce.py --scale demo                         # the same plan, scaled down, on the sample dataset (CPU, minutes)
    python reproduce.py --data /data/imagenet --dry-run      # the plan: each stage, its status and its command
    python reproduce.py --data /data/imagenet --stages 'D*' 'table*-D*'   # only some stages (names or globs)

Run it again after an interruption: complete stages are skipped, an interrupted run is resumed. The
report (report.md, report.json, curves/*.png) goes into --out-dir, each run into <out-dir>/<config>,
TensorBoard events into <log-dir>/<config>. Stages: A, A-LRN, B, C, D, E, C-S384, D-S384, E-S384,
C-jitter, D-jitter, E-jitter (configs/), then table3-<run>, table4-<run>, table5-6 (evaluations).
"""

import argparse
import sys
from pathlib import Path

from vgg.config import check_ranges, get_args_parser
from vgg.core.errors import UserError, out_of_memory_message
from vgg.core.progress import rank_prefix
from vgg.reproduce.plan import DEMO_RUNTIME, SCALES, TRAIN_RUNTIME_FIELDS, Settings
from vgg.reproduce.stages import StageFailed, reproduce
from vgg.training.step import NonFiniteLossError


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[get_args_parser(fields=TRAIN_RUNTIME_FIELDS)])
    parser.add_argument("--scale", choices=SCALES, default="paper",
                        help="paper: the paper's nets and sizes; demo: scaled-down nets on the sample dataset "
                             "(default: paper)")
    parser.add_argument("--data", metavar="ROOT",
                        help="dataset root holding train/ and val/ (required for --scale paper; demo: data/sample)")
    parser.add_argument("--out-dir", metavar="DIR", help="run folders and the report (default: checkpoints, "
                                                         "or checkpoints/reproduce-demo for the demo)")
    parser.add_argument("--log-dir", metavar="DIR", help="TensorBoard root (default: runs, or runs/reproduce-demo)")
    parser.add_argument("--stages", nargs="+", metavar="NAME", help="only these stages (names or globs like 'D*')")
    parser.add_argument("--dry-run", action="store_true", help="print the plan with every command; run nothing")
    return parser


def settings_from_args(args) -> Settings:
    demo = args.scale == "demo"
    if not args.data and not demo:
        raise UserError("--scale paper trains on ImageNet: pass --data ROOT (holding train/ and val/), "
                        "or use --scale demo for the sample dataset")
    typed = {name: getattr(args, name) for name in TRAIN_RUNTIME_FIELDS if hasattr(args, name)}
    check_ranges({"gpus": 1, **typed})  # before the first stage, not in each
    return Settings(scale=args.scale, data=args.data or "data/sample",
                    out_dir=Path(args.out_dir or ("checkpoints/reproduce-demo" if demo else "checkpoints")),
                    log_dir=Path(args.log_dir or ("runs/reproduce-demo" if demo else "runs")),
                    runtime={**(DEMO_RUNTIME if demo else {}), **typed})


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        return reproduce(settings_from_args(args), args.stages, args.dry_run)
    except (UserError, NonFiniteLossError) as e:
        print(f"{rank_prefix()}error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    except StageFailed as e:  # the stage's own process has printed why
        print(f"error: {e}; run the same command again to resume", file=sys.stderr)
        return e.code
    except (RuntimeError, MemoryError) as e:
        message = out_of_memory_message(e, "use more GPUs (--gpus) or smaller test scales")
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
