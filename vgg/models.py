"""The VGG nets of Simonyan & Zisserman (ICLR 2015), Table 1, as data plus one builder.

Each configuration is a list of 5 stages; a stage is a list of conv layers given by their output
channels (3x3, stride 1, padding 1; `(c, 1)` marks C's 1x1 convs) and ends with a 2x2 max-pool of
stride 2. "LRN" marks AlexNet's local response normalisation (A-LRN only). Every conv is followed
by ReLU; the classifier is FC-4096, FC-4096, FC-classes with ReLU and dropout after the first two.
The state-dict keys match torchvision's vgg11/vgg13/vgg16/vgg19 for A/B/D/E.
"""


import torch
import torch.nn as nn

from vgg.errors import UserError

CFGS: dict[str, list[list]] = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "A-LRN": [[64, "LRN"], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "C": [[64, 64], [128, 128], [256, 256, (256, 1)], [512, 512, (512, 1)], [512, 512, (512, 1)]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}
TORCHVISION_NAMES = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}
# Paper §3.1: a deeper net takes net A's first four conv layers, given as (stage, position in stage).
WARM_START_CONVS = [(0, 0), (1, 0), (2, 0), (2, 1)]


def _check_name(name: str) -> None:
    if name not in CFGS:
        raise UserError(f"unknown VGG configuration {name!r}; allowed: {', '.join(CFGS)}")


def make_layers(cfg: list[list], width: float = 1.0) -> tuple[nn.Sequential, dict, int]:
    """Conv stages of one configuration. Returns the layers, a map (stage, position) -> index of
    each conv in the Sequential, and the output channels."""
    layers, conv_index, in_channels = [], {}, 3
    for stage, stage_cfg in enumerate(cfg):
        position = 0
        for item in stage_cfg:
            if item == "LRN":  # AlexNet's LRN (§2.3: it does not help, Table 3)
                layers.append(nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0))
                continue
            channels, kernel = item if isinstance(item, tuple) else (item, 3)
            out_channels = max(1, round(channels * width))
            conv_index[(stage, position)] = len(layers)
            layers += [nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2), nn.ReLU(inplace=True)]
            in_channels, position = out_channels, position + 1
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers), conv_index, in_channels


class VGG(nn.Module):
    """A VGG net for `image_size` x `image_size` inputs (the training crop; 224 in the paper)."""

    def __init__(self, name: str, num_classes: int = 1000, *, width: float = 1.0, fc_width: int = 4096,
                 image_size: int = 224, dropout: float = 0.5):
        super().__init__()
        _check_name(name)
        if image_size < 32 or image_size % 32:
            raise UserError(f"image_size must be a multiple of 32 (five 2x2 max-pools), got {image_size}")
        if width <= 0 or fc_width < 1 or num_classes < 1:
            raise UserError(f"width, fc_width and num_classes must be positive, got {width}, {fc_width}, {num_classes}")
        self.arch_name, self.num_classes, self.image_size = name, num_classes, image_size
        self.width, self.fc_width, self.dropout = width, fc_width, dropout
        self.features, self.conv_index, channels = make_layers(CFGS[name], width)
        self.feature_size = image_size // 32
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
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise UserError(f"net {self.arch_name} takes {self.image_size}x{self.image_size} inputs, got "
                            f"{tuple(x.shape[-2:])}; use to_dense(net) for other sizes (§3.2)")
        return self.classifier(torch.flatten(self.features(x), 1))


def init_weights(model: nn.Module, scheme: str = "normal") -> None:
    """§3.1: weights from N(0, 0.01^2), biases zero; or Glorot & Bengio (2010) uniform ("xavier")."""
    if scheme not in ("normal", "xavier"):
        raise UserError(f"unknown init {scheme!r}; allowed: normal, xavier")
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if scheme == "normal":
                nn.init.normal_(module.weight, mean=0.0, std=0.01)
            else:
                nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)


def build_vgg(name: str, num_classes: int = 1000, *, width: float = 1.0, fc_width: int = 4096,
              image_size: int = 224, dropout: float = 0.5, init: str = "normal") -> VGG:
    """VGG configuration `name` of Table 1 ("A", "A-LRN", "B", "C", "D" or "E").

    With the defaults the parameter counts are those of Table 2: A and A-LRN 132,863,336 (133 M),
    B 133,047,848 (133 M), C 133,638,952 (134 M), D 138,357,544 (138 M), E 143,667,240 (144 M).
    `width` scales the conv channels and `fc_width` the hidden FC layers, for scaled-down nets.
    """
    _check_name(name)
    model = VGG(name, num_classes, width=width, fc_width=fc_width, image_size=image_size, dropout=dropout)
    init_weights(model, init)
    return model


def _conv_key(model: VGG, stage: int, position: int) -> str:
    return f"features.{model.conv_index[(stage, position)]}"


@torch.no_grad()
def warm_start(model: VGG, source_a: VGG) -> list[str]:
    """§3.1: initialise a deeper net's first four conv layers and its three FC layers from net A.

    The first four convs of A (the first conv of stages 1, 2, 3 and the second of stage 3) go into
    the conv of the same stage and position; the layers in between keep their fresh init.
    Returns the state-dict keys that were copied.
    """
    if source_a.arch_name != "A":
        raise UserError(f"warm start takes net A as its source, got net {source_a.arch_name}")
    target, source = model.state_dict(), source_a.state_dict()
    pairs = [(_conv_key(model, *where), _conv_key(source_a, *where)) for where in WARM_START_CONVS]
    pairs += [(f"classifier.{i}", f"classifier.{i}") for i in (0, 3, 6)]
    copied = []
    for target_prefix, source_prefix in pairs:
        for suffix in ("weight", "bias"):
            t_key, s_key = f"{target_prefix}.{suffix}", f"{source_prefix}.{suffix}"
            if target[t_key].shape != source[s_key].shape:
                raise UserError(f"warm start: {s_key} of net A has shape {tuple(source[s_key].shape)}, "
                                f"{t_key} of net {model.arch_name} {tuple(target[t_key].shape)} "
                                "(same width, FC width, crop size and classes needed)")
            target[t_key].copy_(source[s_key])
            copied.append(t_key)
    return copied


class DenseVGG(nn.Module):
    """§3.2: the net made fully convolutional (FC1 -> k x k conv, FC2 and FC3 -> 1x1 convs).

    Takes any image of at least `min_input_size` on both sides and returns a class score map
    [B, classes, h, w]; at exactly the training crop size the map is 1x1 and equals the logits.
    """

    def __init__(self, model: VGG):
        super().__init__()
        self.arch_name, self.num_classes, self.min_input_size = model.arch_name, model.num_classes, model.image_size
        self.features = model.features
        fc1, fc2, fc3 = (model.classifier[i] for i in (0, 3, 6))
        k = model.feature_size
        channels = fc1.in_features // (k * k)
        convs = [nn.Conv2d(channels, fc1.out_features, k), nn.Conv2d(fc2.in_features, fc2.out_features, 1),
                 nn.Conv2d(fc3.in_features, fc3.out_features, 1)]
        with torch.no_grad():
            for conv, fc in zip(convs, (fc1, fc2, fc3)):
                conv.weight.copy_(fc.weight.view(conv.weight.shape))
                conv.bias.copy_(fc.bias)
        self.classifier = nn.Sequential(convs[0], nn.ReLU(inplace=True), nn.Dropout(model.dropout),
                                        convs[1], nn.ReLU(inplace=True), nn.Dropout(model.dropout), convs[2])
        self.to(fc1.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_input_size:
            raise UserError(f"dense net {self.arch_name} needs inputs of at least {self.min_input_size}x"
                            f"{self.min_input_size}, got {tuple(x.shape[-2:])}")
        return self.classifier(self.features(x))


def to_dense(model: VGG) -> DenseVGG:
    """The fully-convolutional net of §3.2 (shares the conv layers, copies the FC weights)."""
    return DenseVGG(model)


def _check_torchvision(name: str) -> None:
    if name not in TORCHVISION_NAMES:
        raise UserError(f"net {name} has no torchvision counterpart; only "
                        f"{', '.join(f'{k} ({v})' for k, v in TORCHVISION_NAMES.items())} do")


def from_torchvision_state_dict(state_dict: dict, name: str) -> dict:
    """torchvision vgg11/13/16/19 weights -> ours for A/B/D/E: the keys are the same; checked here."""
    _check_torchvision(name)
    expected = set(VGG(name, num_classes=1, fc_width=1).state_dict())
    if {k for k in state_dict if not k.startswith("classifier")} != {k for k in expected if not k.startswith("classifier")}:
        raise UserError(f"not a torchvision {TORCHVISION_NAMES[name]} state dict")
    return dict(state_dict)


def to_torchvision_state_dict(state_dict: dict, name: str) -> dict:
    """Our A/B/D/E weights -> torchvision vgg11/13/16/19 (load with strict=True)."""
    _check_torchvision(name)
    return dict(state_dict)
