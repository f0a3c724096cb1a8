"""Batches (paper §3.1): making the training and test batches from a dataset's files. The JPEG library
and a file's verdict (`jpeg.py`: nvImageCodec, the crop box's region decode, `Check`), decoding to uint8
RGB and the record of a file that would not decode (`decode.py`: `Unreadable`), the training and
test-time transforms (`transforms.py`), the collate functions, DataLoader workers and samplers
(`loaders.py`), and the GPU data path (`gpu.py`, `gpu_decode.py`, `gpu_augment.py`).

May import: vgg.core. Not vgg.data.datasets: a dataset hands this package paths, bytes or images (the GPU
path knows an `ImageFolder` by its cached verdicts, without importing it); the arrow runs datasets ->
batches only.
"""
