"""The data (paper §2.1, §3.1): ImageNet as class folders or WebDataset shards, the sources people get
it from, dataset statistics, the training and test-time transforms with the cropped JPEG decode
(nvImageCodec) and the once-per-dataset damage check, the GPU data path, samplers and loaders, and the
generated sample sets. `python -m vgg.data` is its command line (vgg/data/__main__.py).

May import: vgg.core. Nothing here knows the nets, the config or the training run.
"""
