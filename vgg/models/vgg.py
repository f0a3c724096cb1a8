"""The VGG nets of Simonyan & Zisserman (ICLR 2015), Table 1, as data plus one builder.

Each configuration is a list of 5 stages; a stage is a list of conv layers given by their output
channels (3x3, stride 1, padding 1; `(channels, 1)` marks C's 1x1 convs) and ends with a 2x2
max-pool of stride 2. "LRN" marks AlexNet's local response normalisation (A-LRN only). Every conv
is followed by ReLU; the classifier is FC-4096, FC-4096, FC-classes with ReLU and dropout after the
first two. The state-dict keys match torchvision's vgg11/vgg13/vgg16/vgg19 for A/B/D/E.

Unlike torchvision there is no adaptive average pool: the first FC layer takes the feature map of
the training crop (7x7 at 224) and other sizes go through `to_dense` (paper §3.2).
"""

import copy

import torch
import torch.nn as nn

from vgg.core.errors import UserError

CFGS: dict[str, list[list]] = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "A-LRN": [[64, "LRN"], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "C": [[64, 64], [128, 128], [256, 256, (256, 1)], [512, 512, (512, 1)], [512, 512, (512, 1)]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}
TORCHVISION_NAMES = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}
INIT_SCHEMES = ("normal", "xavier")
# Paper §3.1: a deeper net takes net A's first four conv layers, given as (stage, position in stage).
WARM_START_CONVS = [(0, 0), (1, 0), (2, 0), (2, 1)]
FC_INDICES = (0, 3, 6)  # the three Linear layers in `classifier` (torchvision's indices too)


def _check_name(name) -> None:
    if name not in CFGS:
        raise UserError(f"unknown VGG configuration {name!r}; allowed: {', '.join(CFGS)}")


def make_layers(cfg: list[list], width: float = 1.0) -> tuple[nn.Sequential, dict, int]:
    """Conv stages of one configuration of Table 1.

    Returns the layers, a map (stage, position) -> index of each conv in the Sequential (the
    positions count convs only, so A-LRN's LRN does not shift them), and the output channels.
    """
    layers, conv_index, in_channels = [], {}, 3
    for stage, stage_cfg in enumerate(cfg):
        position = 0
        for item in stage_cfg:
            if item == "LRN":  # AlexNet's LRN, after the first conv + ReLU (§2.3: it does not help, Table 3)
                layers.append(alexnet_lrn())
                continue
            channels, kernel = item if isinstance(item, tuple) else (item, 3)
            out_channels = max(1, round(channels * width))
            conv_index[(stage, position)] = len(layers)
            # 3x3 (or C's 1x1) convs, stride 1, padding keeping the spatial size (§2.1)
            layers += [nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2), nn.ReLU(inplace=True)]
            in_channels, position = out_channels, position + 1
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))  # closes every stage (§2.1)
    return nn.Sequential(*layers), conv_index, in_channels


# AlexNet's LRN (Krizhevsky et al. 2012, §3.3), which A-LRN takes (§2.3): k=2, n=5, alpha=1e-4, beta=0.75
# in b = a / (k + alpha * sum of a^2 over n neighbouring channels)^beta. torch's LocalResponseNorm (like
# Caffe's layer) divides alpha by n, so AlexNet's alpha is passed as alpha * n (the VGG group's own Caffe
# models use 5e-4 in that form).
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0


def alexnet_lrn() -> nn.LocalResponseNorm:
    return nn.LocalResponseNorm(size=LRN_SIZE, alpha=LRN_ALPHA * LRN_SIZE, beta=LRN_BETA, k=LRN_K)


class VGG(nn.Module):
    """A VGG net of Table 1 for `image_size` x `image_size` inputs (the training crop; 224 in the paper)."""

    def __init__(self, name: str, num_classes: int = 1000, *, width: float = 1.0, fc_width: int = 4096,
                 image_size: int = 224, dropout: float = 0.5):
        super().__init__()
        _check_name(name)
        if not isinstance(image_size, int) or image_size < 32 or image_size % 32:
            raise UserError(f"image_size must be a multiple of 32 (five 2x2 max-pools) and at least 32, "
                            f"got {image_size}")
        if not width > 0:
            raise UserError(f"width must be a positive channel multiplier (1.0 is the paper's), got {width}")
        if not isinstance(fc_width, int) or fc_width < 1:
            raise UserError(f"fc_width must be a positive integer (4096 is the paper's), got {fc_width}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise UserError(f"num_classes must be a positive integer, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1) (0.5 is the paper's), got {dropout}")
        self.arch_name, self.num_classes, self.image_size = name, num_classes, image_size
        self.width, self.fc_width, self.dropout = width, fc_width, dropout
        self.features, self.conv_index, channels = make_layers(CFGS[name], width)
        self.feature_size = image_size // 32  # 7 at 224
        # §2.1: FC-4096, FC-4096, FC-classes; dropout on the first two (§3.1). Soft-max is in the loss.
        self.classifier = nn.Sequential(
            nn.Linear(channels * self.feature_size**2, fc_width), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(fc_width, fc_width), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(fc_width, num_classes),
        )

    def arch_kwargs(self) -> dict:
        """The keyword arguments that rebuild this net with `build_vgg(**kwargs)`."""
        return {"name": self.arch_name, "num_classes": self.num_classes, "width": self.width,
                "fc_width": self.fc_width, "image_size": self.image_size, "dropout": self.dropout}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float images [B, 3, image_size, image_size] -> logits [B, num_classes]."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise UserError(f"net {self.arch_name} takes {self.image_size}x{self.image_size} inputs, got "
                            f"{tuple(x.shape[-2:])}; use to_dense(net) for other sizes (§3.2)")
        return self.classifier(torch.flatten(self.features(x), 1))


def init_weights(model: nn.Module, scheme: str = "normal") -> None:
    """§3.1: weights from N(0, 0.01^2) and zero biases ("normal"), or Glorot & Bengio (2010)
    uniform weights and zero biases ("xavier", which the paper notes works without pre-training)."""
    if scheme not in INIT_SCHEMES:
        raise UserError(f"unknown init {scheme!r}; allowed: {', '.join(INIT_SCHEMES)}")
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if scheme == "normal":
                nn.init.normal_(module.weight, mean=0.0, std=0.01)
            else:
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:  # (ResNets' and GoogLeNet's convs, followed by batch norm, have none)
                nn.init.zeros_(module.bias)


def build_vgg(name: str, num_classes: int = 1000, *, width: float = 1.0, fc_width: int = 4096,
              image_size: int = 224, dropout: float = 0.5, init: str = "normal") -> VGG:
    """VGG configuration `name` of Table 1 ("A", "A-LRN", "B", "C", "D" or "E"), initialised (§3.1).

    With the defaults the parameter counts are those of Table 2: A and A-LRN 132,863,336 (133 M),
    B 133,047,848 (133 M), C 133,638,952 (134 M), D 138,357,544 (138 M), E 143,667,240 (144 M).
    `width` scales the conv channels (at least 1 each) and `fc_width` the hidden FC layers, for
    scaled-down nets built by the same code; `image_size` is the training crop (224 in the paper).
    """
    _check_name(name)
    if init not in INIT_SCHEMES:
        raise UserError(f"unknown init {init!r}; allowed: {', '.join(INIT_SCHEMES)}")
    model = VGG(name, num_classes, width=width, fc_width=fc_width, image_size=image_size, dropout=dropout)
    init_weights(model, init)
    return model


@torch.no_grad()
def warm_start(model: VGG, source_a: VGG) -> list[str]:
    """§3.1: initialise a deeper net's first four conv layers and its three FC layers from net A.

    The first four convs of A (the first conv of stages 1, 2, 3 and the second of stage 3) go into
    the conv of the same stage and position (for C that is a 3x3 conv; its 1x1 is third); the layers
    in between keep their fresh init. Everything is checked before anything is copied. Returns the
    state-dict keys of `model` that were copied.
    """
    if getattr(source_a, "arch_name", None) != "A":
        raise UserError(f"warm start takes net A as its source, got net {getattr(source_a, 'arch_name', source_a)}")
    target, source = model.state_dict(), source_a.state_dict()
    prefixes = [(f"features.{model.conv_index[where]}", f"features.{source_a.conv_index[where]}")
                for where in WARM_START_CONVS]
    prefixes += [(f"classifier.{i}", f"classifier.{i}") for i in FC_INDICES]
    pairs = [(f"{t}.{suffix}", f"{s}.{suffix}") for t, s in prefixes for suffix in ("weight", "bias")]
    for t_key, s_key in pairs:
        if target[t_key].shape != source[s_key].shape:
            raise UserError(f"warm start: {s_key} of net A has shape {tuple(source[s_key].shape)}, "
                            f"{t_key} of net {model.arch_name} {tuple(target[t_key].shape)} "
                            "(same width, fc_width, image_size and num_classes needed)")
    for t_key, s_key in pairs:
        target[t_key].copy_(source[s_key])  # state-dict tensors share storage with the parameters
    return [t_key for t_key, _ in pairs]


class DenseVGG(nn.Module):
    """§3.2: the net made fully convolutional (FC1 -> k x k conv with k = image_size/32, FC2 and
    FC3 -> 1x1 convs), same ReLU/Dropout order.

    Takes any image of at least `min_input_size` on both sides and returns a class score map
    [B, classes, h, w]; at exactly the training crop size the map is 1x1 and equals the logits.
    """

    def __init__(self, model: VGG):
        super().__init__()
        self.arch_name, self.num_classes = model.arch_name, model.num_classes
        self.min_input_size = model.image_size
        self.features = copy.deepcopy(model.features)
        # Pool with ceil, as Caffe (which the authors used) does: on a side that is not a multiple of 32
        # the last, partial window is kept, so the score map covers the whole image, right and bottom
        # borders included (ceil(Q/32) - crop/32 + 1 positions a side). Same output at multiples of 32.
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                layer.ceil_mode = True
        fc1, fc2, fc3 = (model.classifier[i] for i in FC_INDICES)
        k = model.feature_size
        channels = fc1.in_features // (k * k)
        factory = {"device": fc1.weight.device, "dtype": fc1.weight.dtype}
        convs = [nn.Conv2d(channels, fc1.out_features, k, **factory),
                 nn.Conv2d(fc2.in_features, fc2.out_features, 1, **factory),
                 nn.Conv2d(fc3.in_features, fc3.out_features, 1, **factory)]
        with torch.no_grad():
            for conv, fc in zip(convs, (fc1, fc2, fc3)):
                # torch.flatten of [C, k, k] is channel-major, so a row of FC1 is a C x k x k kernel
                conv.weight.copy_(fc.weight.reshape(conv.weight.shape))
                conv.bias.copy_(fc.bias)
        self.classifier = nn.Sequential(convs[0], nn.ReLU(inplace=True), nn.Dropout(model.dropout),
                                        convs[1], nn.ReLU(inplace=True), nn.Dropout(model.dropout), convs[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float images [B, 3, H, W] with H, W >= min_input_size -> class score map [B, classes, h, w]."""
        if min(x.shape[-2:]) < self.min_input_size:
            raise UserError(f"dense net {self.arch_name} needs inputs of at least {self.min_input_size}x"
                            f"{self.min_input_size} (its training crop), got {tuple(x.shape[-2:])}")
        return self.classifier(self.features(x))


def to_dense(model: VGG) -> DenseVGG:
    """The fully-convolutional net of §3.2, a copy: later changes to `model` do not reach it."""
    return DenseVGG(model)


def _layout(name: str) -> dict[str, tuple[int, ...]]:
    """Feature-layer state-dict keys of net `name` -> kernel size (C's 1x1 convs sit at D's indices)."""
    with torch.device("meta"):
        features, _, _ = make_layers(CFGS[name], width=1 / 64)
    return {f"features.{i}.{suffix}": tuple(m.kernel_size)
            for i, m in enumerate(features) if isinstance(m, nn.Conv2d) for suffix in ("weight", "bias")}


def _matches(state_dict: dict, name: str) -> bool:
    layout = _layout(name)
    keys = {k for k in state_dict if k.startswith("features.")}
    fc_keys = {f"classifier.{i}.{suffix}" for i in FC_INDICES for suffix in ("weight", "bias")}
    return (keys == set(layout) and set(state_dict) - keys == fc_keys
            and all(tuple(state_dict[k].shape[-2:]) == kernel for k, kernel in layout.items() if k.endswith("weight")))


def _torchvision_twin(state_dict: dict, name: str | None) -> str:
    """Checks that `state_dict` is a VGG state dict (of net `name`, or found from its layers) with a
    torchvision twin; returns the net's name."""
    if name is None:
        found = [n for n in CFGS if _matches(state_dict, n)]
        if not found:
            raise UserError("not a state dict of VGG net A, A-LRN, B, C, D or E (keys: "
                            f"{', '.join(list(state_dict)[:4])}, ...)")
        name = found[0]
    else:
        _check_name(name)
    if name not in TORCHVISION_NAMES:
        raise UserError(f"net {name} has no torchvision counterpart; only "
                        f"{', '.join(f'{k} ({v})' for k, v in TORCHVISION_NAMES.items())} do")
    if not _matches(state_dict, name):
        raise UserError(f"not a state dict of net {name} / torchvision {TORCHVISION_NAMES[name]}")
    return name


def from_torchvision_state_dict(state_dict: dict, name: str | None = None) -> dict:
    """torchvision vgg11/13/16/19 weights -> ours for A/B/D/E (load with strict=True).

    The keys are the same (torchvision's parameter-free `avgpool` is the identity at 224), so this
    checks the layout and returns a shallow copy. `name` is found from the layers when not given;
    A-LRN and C, which torchvision lacks, raise UserError.
    """
    _torchvision_twin(state_dict, name)
    return dict(state_dict)


def to_torchvision_state_dict(state_dict: dict, name: str | None = None) -> dict:
    """Our A/B/D/E weights -> torchvision vgg11/13/16/19 (load with strict=True); A-LRN and C raise UserError."""
    _torchvision_twin(state_dict, name)
    return dict(state_dict)
