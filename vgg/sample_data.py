"""`python -m vgg.sample_data [--out DIR] [--seed N] [--digits]`: kept for the commands that name it; it is
`python -m vgg.data sample` (vgg/data/__main__.py), and the generator lives in vgg.data.datasets.sample."""

import sys

from vgg.data.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
