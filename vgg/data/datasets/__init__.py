"""Datasets (paper §2.1): what a dataset is and how it is read. ImageNet as class folders (`folders.py`:
the file list, scanned once and cached, and `ImageFolder`) or as WebDataset shards (`shards.py`: streaming
and reading by position; `shard_format.py`: the format; `shard_writer.py`: writing them); each file's
damage verdict, checked once per dataset (`checks.py`); the caches kept beside a split or under
~/.cache/vgg-imagenet (`cache.py`); the class lists and validation labels (`labels.py`); ImageNet's
sources as people get it, made into class folders (`prepare.py`: each source's layout and labels;
`unpack.py`: the files put in place, the tars read); the generated sample sets
(`sample.py`); the dataset statistics (`stats.py`: mean RGB, colour PCA).

May import: vgg.core, vgg.data.batches (a dataset's items are decoded and transformed by the transforms
of that package, and read through its loaders). vgg.data.batches never imports this package.
"""
