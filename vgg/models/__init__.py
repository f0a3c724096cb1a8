"""The nets: VGG A, A-LRN, B, C, D, E as the paper's Table 1 (vgg.models.vgg), the neighbours of Table 7
built with torchvision's builders and LeNet-5 (vgg.models.zoo), torchvision's published weights
(vgg.models.pretrained), and a net rebuilt from a checkpoint (vgg.models.checkpoint).

May import: vgg.core, vgg.data.datasets.stats (the mean a published net was trained with).

    from vgg.models import build_vgg, to_dense
"""

from vgg.models.vgg import CFGS, VGG, DenseVGG, build_vgg, init_weights, make_layers, to_dense, warm_start

__all__ = ["CFGS", "VGG", "DenseVGG", "build_vgg", "init_weights", "make_layers", "to_dense", "warm_start"]
