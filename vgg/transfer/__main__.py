"""`python -m vgg.transfer sample [--out data/transfer] [--seed 0]`: the small generated datasets in each
layout transfer.py reads (vgg/transfer/sample.py), for the CPU demo."""

import argparse
import sys

from vgg.core.errors import UserError
from vgg.transfer.sample import DEFAULT_ROOT, make_transfer_samples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vgg.transfer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample", help="generate the demo datasets (folders, VOC2007, caltech)")
    sample.add_argument("--out", default=str(DEFAULT_ROOT), help=f"where (default: {DEFAULT_ROOT})")
    sample.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        root = make_transfer_samples(args.out, seed=args.seed)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{root}: folders/, VOC2007/, caltech/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
