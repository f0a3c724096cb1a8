"""torchvision's published VGG weights (vgg11/13/16/19, IMAGENET1K_V1) as nets of this pipeline, to
evaluate the paper's way (dense, multi-crop, multi-scale, fusion) or to fine-tune from.

torchvision's nets take (x/255 - mean) / std per channel; ours take x - mean_rgb on 0-255 pixels (§2.1).
The std is folded into the first conv: conv(W, (x - m) / s) = conv(W / s, x - m) channel by channel,
exactly (the zero padding of x - m is still zero). So a torchvision VGG becomes one of ours with
mean_rgb = 255 * mean, and a checkpoint made from it carries its own input normalisation in its
`stats` like any other: evaluation and `--init-from` apply it with no special case.
"""

import pickle
import urllib.error
from pathlib import Path

import torch
import torchvision

from vgg.core.errors import UserError
from vgg.data.datasets.stats import IMAGENET_STATS, DatasetStats
from vgg.models.vgg import TORCHVISION_NAMES, VGG, _torchvision_twin, build_vgg

TORCHVISION_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet normalisation (its weights' transforms())
TORCHVISION_STD = (0.229, 0.224, 0.225)
WEIGHTS = {tv: f"{tv.upper()}_Weights.IMAGENET1K_V1" for tv in TORCHVISION_NAMES.values()}
# The paper's multi-scale test set for a net trained on a range of scales (§4.2, Q = {256, 384, 512}):
# torchvision's VGGs were trained on random-sized crops, which cover that range.
TEST_SCALE_MIN, TEST_SCALE_MAX = 256, 512


def is_bare_state_dict(obj) -> bool:
    """A plain VGG state dict (torchvision's .pth files), not one of our checkpoints."""
    return (isinstance(obj, dict) and "features.0.weight" in obj
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def fold_input_std(state_dict: dict, std=TORCHVISION_STD) -> dict:
    """The same net for inputs x - 255 * mean instead of (x / 255 - mean) / std: the first conv's weights
    divided by 255 * std of their input channel. A shallow copy; the input tensors are untouched."""
    folded = dict(state_dict)
    scale = 255.0 * torch.tensor(std, dtype=folded["features.0.weight"].dtype)
    folded["features.0.weight"] = folded["features.0.weight"] / scale[None, :, None, None]
    return folded


def torchvision_stats() -> DatasetStats:
    """torchvision's mean on the 0-255 scale; the colour-shift PCA (fine-tuning only) is ImageNet's."""
    return DatasetStats(mean_rgb=tuple(255.0 * m for m in TORCHVISION_MEAN),
                        eigval=IMAGENET_STATS.eigval, eigvec=IMAGENET_STATS.eigvec)


def checkpoint_from_state_dict(state_dict: dict, source: str) -> dict:
    """A torchvision VGG state dict -> one of our checkpoints (arch, stats, the test scales; `classes`
    empty: the net takes the sorted wnids of the data it meets, which is torchvision's class order)."""
    name = _torchvision_twin(state_dict, None)
    with torch.device("meta"):
        model: VGG = build_vgg(name, num_classes=state_dict["classifier.6.weight"].shape[0])
    return {"model": fold_input_std(state_dict), "arch": model.arch_kwargs(), "stats": torchvision_stats().to_dict(),
            "classes": [], "config": {"scale_min": TEST_SCALE_MIN, "scale_max": TEST_SCALE_MAX,
                                        "run_name": source}}


def cache_file(tv_name: str) -> Path:
    """Where torchvision's weights API keeps (and looks for) the file: $TORCH_HOME/hub/checkpoints/."""
    weights = torchvision.models.get_weight(WEIGHTS[tv_name])
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def torchvision_state_dict(spec: str) -> tuple[str, dict]:
    """'torchvision:vgg16' -> ('vgg16', its IMAGENET1K_V1 state dict) through torchvision's weights API
    and cache; without network and cache, one line saying where to put the file."""
    tv_name = spec.split(":", 1)[1]
    if tv_name not in WEIGHTS:
        raise UserError(f"unknown weights {spec!r}; allowed: {', '.join('torchvision:' + n for n in WEIGHTS)}")
    weights = torchvision.models.get_weight(WEIGHTS[tv_name])
    cached = cache_file(tv_name)
    try:
        return tv_name, weights.get_state_dict(progress=False, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        if cached.is_file():  # torch.hub loads a cached file unchecked (the hash is checked on download only)
            raise UserError(f"{spec}: {cached} is cut short or damaged ({reason}): delete it to download it again, "
                            f"or put a complete copy of {weights.url} there") from None
        if not isinstance(e, OSError):  # (URLError is one) not the download: a bug, with its traceback
            raise
        raise UserError(f"{spec}: cannot download {weights.url} ({e}); on a machine without network, "
                        f"put that file at {cached}") from None
