"""The data (paper §2.1, §3.1), in two parts: `vgg.data.datasets`, what a dataset is and how it is read
(ImageNet as class folders or WebDataset shards, the sources people get it from, each file's damage
verdict, dataset statistics, the generated sample sets), and `vgg.data.batches`, making batches from it
(the training and test-time transforms with the cropped JPEG decode (nvImageCodec), samplers and loaders,
the GPU data path). Imports run datasets -> batches, never back. `python -m vgg.data` is its command
line (vgg/data/__main__.py).

May import: vgg.core. Nothing here knows the nets, the config or the training run.
"""
