"""The paper's neighbours under the same protocol (Table 7): AlexNet, GoogLeNet, the ResNets and
Inception-v3 from torchvision's own builders, and LeCun's LeNet-5, beside the VGG nets of vgg.models.

Every net here is built by `build_net(name, ...)` and carries what the pipeline asks of a VGG:
`arch_name`, `num_classes`, `image_size` (its training crop) and `arch_kwargs()` (what rebuilds it;
stored in checkpoints). torchvision's nets are torchvision's own modules, so their state dicts are
torchvision's and its published weights load as they are. The paper's VGG-only steps stay VGG-only:
the warm start from net A (§3.1) and the FC -> conv conversion of `vgg.models.to_dense` (§3.2).
`to_dense` here gives each other net the dense evaluation it supports: the global-pooling nets
(GoogLeNet, ResNet, Inception-v3) already take any image size and average over all positions, and
AlexNet and LeNet-5 get their FC -> conv form like VGG's.
"""

import copy
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from vgg.core.errors import UserError
from vgg.models.vgg import CFGS, INIT_SCHEMES, DenseVGG, build_vgg, init_weights

VGG_ARCHS = tuple(CFGS)
TORCHVISION_ARCHS = ("alexnet", "googlenet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                     "inception_v3")
ARCH_NAMES = VGG_ARCHS + TORCHVISION_ARCHS + ("lenet5",)
# Nets built with a dropout argument (the others have no dropout); the value is the config's `dropout`.
TAKES_DROPOUT = ("alexnet", "googlenet", "inception_v3", "lenet5")
# Weight of each auxiliary classifier's loss in training. GoogLeNet (Szegedy et al. 2015, §5): "the losses
# of the auxiliary classifiers were weighted by 0.3". Inception-v3's paper (Szegedy et al. 2016, §7) gives
# no weight; 0.4 is that of the authors' TF-slim training script (train_image_classifier.py).
AUX_LOSS_WEIGHT = {"googlenet": 0.3, "inception_v3": 0.4}
GLOBAL_POOL_ARCHS = ("googlenet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "inception_v3")


def check_input_size(name: str, size: int, what: str = "crop_size") -> None:
    """The training crops each net takes (one line naming what is allowed)."""
    if name not in ARCH_NAMES:
        raise UserError(f"unknown net {name!r}; allowed: {', '.join(ARCH_NAMES)}")
    if name in VGG_ARCHS:
        ok, allowed = size >= 32 and size % 32 == 0, "a multiple of 32 (five 2x2 max-pools), at least 32"
    elif name == "alexnet":  # FC1 takes the 6x6 map of the last pool, as in AlexNet (224 -> 6x6)
        ok, allowed = 223 <= size <= 246, "223..246, where the last pool's map is 6x6 (224 in AlexNet)"
    elif name == "inception_v3":  # the auxiliary head's 5x5 conv needs the 17x17 map of a 299 input
        ok, allowed = size >= 299, "at least 299 (Inception-v3's input; its auxiliary head needs it)"
    elif name == "lenet5":
        ok, allowed = size == 32, "32 (LeNet-5's input)"
    else:  # global average pooling: any size the stride-32 stem leaves a map for
        ok, allowed = size >= 32, "at least 32"
    if not ok:
        raise UserError(f"{what} {size} does not suit net {name}: it must be {allowed}")


class LeNet5(nn.Module):
    """LeNet-5 (LeCun, Bottou, Bengio & Haffner 1998, §II.B): C1-S2-C3-S4-C5-F6-output on 32x32 inputs,
    with the paper's scaled tanh, 1.7159 tanh(2a/3) (its Appendix A).

    Three simplifications, as in most modern re-implementations: 3 input channels (this pipeline's RGB;
    the paper's digits were grey), C3 connected to all six S2 maps (not the paper's Table I), and the
    subsampling layers are plain 2x2 average pools (no trainable coefficient and bias), the output a
    linear layer under soft-max cross-entropy (not Euclidean RBF units).
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(
            InputScale(1 / 64),  # §II.A: inputs of mean about 0 and variance about 1 (ours: pixels minus the mean)
            nn.Conv2d(3, 6, 5), ScaledTanh(), nn.AvgPool2d(2),     # C1 6@28x28, S2 6@14x14
            nn.Conv2d(6, 16, 5), ScaledTanh(), nn.AvgPool2d(2),    # C3 16@10x10, S4 16@5x5
            nn.Conv2d(16, 120, 5), ScaledTanh(),                   # C5 120@1x1 (a conv in the paper too)
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(120, 84), ScaledTanh(),
                                        nn.Linear(84, num_classes))  # F6, output
        # Appendix A: weights uniform in +-2.4 / fan-in (biases zero here), the init `init: default` keeps
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                nn.init.uniform_(module.weight, -2.4 / fan_in, 2.4 / fan_in)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class InputScale(nn.Module):
    """Multiplies by a constant: LeNet-5's tanh units need inputs of unit scale, not 0-255 pixel values."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class ScaledTanh(nn.Module):
    """f(a) = A tanh(S a) with A = 1.7159, S = 2/3 (LeCun et al. 1998, Appendix A): f(1) = 1, f(-1) = -1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.7159 * torch.tanh(x * (2.0 / 3.0))


def build_net(name: str, num_classes: int = 1000, *, width: float = 1.0, fc_width: int = 4096,
              image_size: int = 224, dropout: float = 0.5, init: str = "normal") -> nn.Module:
    """Any net of ARCH_NAMES, initialised.

    VGG nets go to vgg.models.build_vgg (width, fc_width: its scaled-down forms). The others take
    `image_size` as their training crop (checked by check_input_size) and `dropout` where they have
    dropout; init "default" keeps the builder's own init (that of each net's paper, e.g. He et al.'s
    for ResNets), "normal" and "xavier" are §3.1's schemes.
    """
    if name in VGG_ARCHS:
        return build_vgg(name, num_classes, width=width, fc_width=fc_width, image_size=image_size,
                         dropout=dropout, init="normal" if init == "default" else init)
    check_input_size(name, image_size, "image_size")
    if init not in INIT_SCHEMES + ("default",):
        raise UserError(f"unknown init {init!r}; allowed: {', '.join(INIT_SCHEMES + ('default',))}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {dropout}")
    extra = {"dropout": dropout} if name in TAKES_DROPOUT else {}
    if name == "lenet5":
        model = LeNet5(num_classes, **extra)
    else:
        if name in AUX_LOSS_WEIGHT:  # trained with their auxiliary heads; init_weights: the paper's init
            extra.update(aux_logits=True, init_weights=True)
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)
    if init != "default":
        init_weights(model, init)
    model.arch_name, model.num_classes, model.image_size = name, num_classes, image_size
    # What rebuilds this net (checkpoints store it); a function, not a method, since the class is torchvision's.
    model.arch_kwargs = functools.partial(dict, name=name, num_classes=num_classes, image_size=image_size,
                                          dropout=dropout)
    return model


def build_net_from_kwargs(arch: dict) -> nn.Module:
    """The net a checkpoint's `arch` (a net's arch_kwargs()) describes, freshly initialised."""
    return build_net(**arch, init="default")


def main_logits(outputs) -> torch.Tensor:
    """The main classifier's logits from a net's training-mode output (GoogLeNet and Inception-v3
    return a named tuple with their auxiliary heads' logits; the others a tensor)."""
    return outputs if isinstance(outputs, torch.Tensor) else outputs[0]


# The named tuples torchvision's nets return in training mode with their auxiliary heads.
AUX_OUTPUTS = {"GoogLeNetOutputs": "googlenet", "InceptionOutputs": "inception_v3"}


def training_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    """fp32 soft-max cross-entropy of the main classifier, plus each auxiliary classifier's weighted by
    AUX_LOSS_WEIGHT for the nets that have them (their auxiliary heads only train; testing uses the main)."""
    loss = F.cross_entropy(main_logits(outputs).float(), labels)
    if isinstance(outputs, torch.Tensor):
        return loss
    weight = AUX_LOSS_WEIGHT[AUX_OUTPUTS[type(outputs).__name__]]
    for aux in outputs[1:]:
        if aux is not None:
            loss = loss + weight * F.cross_entropy(aux.float(), labels)
    return loss


class GlobalPoolDense(nn.Module):
    """A global-average-pooling net as a dense net: it already applies its classifier to the average
    over all positions, so it takes any image and returns a 1x1 class score map [B, classes, 1, 1]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.net = copy.deepcopy(model).eval()
        self.arch_name, self.num_classes = model.arch_name, model.num_classes
        self.min_input_size = 75 if model.arch_name == "inception_v3" else 32  # torchvision's minimum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_input_size:
            raise UserError(f"dense net {self.arch_name} needs inputs of at least {self.min_input_size}x"
                            f"{self.min_input_size}, got {tuple(x.shape[-2:])}")
        return self.net(x)[:, :, None, None]


class DenseFC(nn.Module):
    """AlexNet or LeNet-5 made fully convolutional as §3.2 does for VGG: each FC layer becomes a conv
    (the first with the kernel of the map it took, the others 1x1), the same activations in between."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.arch_name, self.num_classes = model.arch_name, model.num_classes
        self.min_input_size = model.image_size
        self.features = copy.deepcopy(model.features)
        if model.arch_name == "alexnet":
            in_channels, k = 256, 6  # the 6x6x256 map that AlexNet's adaptive pool passes on unchanged
        else:
            in_channels, k = 120, 1
        layers = []
        for layer in model.classifier:
            if isinstance(layer, nn.Linear):
                conv = nn.Conv2d(in_channels, layer.out_features, k, device=layer.weight.device,
                                 dtype=layer.weight.dtype)
                with torch.no_grad():
                    conv.weight.copy_(layer.weight.reshape(conv.weight.shape))
                    conv.bias.copy_(layer.bias)
                layers.append(conv)
                in_channels, k = layer.out_features, 1
            elif not isinstance(layer, nn.Flatten):
                layers.append(copy.deepcopy(layer))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_input_size:
            raise UserError(f"dense net {self.arch_name} needs inputs of at least {self.min_input_size}x"
                            f"{self.min_input_size} (its training crop), got {tuple(x.shape[-2:])}")
        return self.classifier(self.features(x))


def to_dense(model: nn.Module) -> nn.Module:
    """The dense (fully-convolutional) form of any net here, a copy: [B, 3, H, W] -> [B, classes, h, w]."""
    name = model.arch_name
    if name in VGG_ARCHS:
        return DenseVGG(model)
    if name in GLOBAL_POOL_ARCHS:
        return GlobalPoolDense(model)
    return DenseFC(model)


def is_auxiliary(parameter_name: str) -> bool:
    """Parameters of GoogLeNet's (aux1, aux2) and Inception-v3's (AuxLogits) training-only heads."""
    return parameter_name.split(".")[0] in ("aux1", "aux2", "AuxLogits")


def parameter_count(name: str, num_classes: int = 1000, *, auxiliary: bool = False) -> int:
    """Parameters of net `name` at full size, without its auxiliary heads unless asked (those only
    train; the net tested, and torchvision's published weights, have none). Built on the meta device."""
    size = 299 if name == "inception_v3" else 32 if name == "lenet5" else 224
    with torch.device("meta"):
        model = build_net(name, num_classes, image_size=size, init="default")
    return sum(p.numel() for n, p in model.named_parameters() if auxiliary or not is_auxiliary(n))
