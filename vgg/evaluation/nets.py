"""The nets under test: a checkpoint (or torchvision's published weights) with the scales it is tested at.
"""

from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from vgg.core.checkpoint import EVAL_KEYS
from vgg.core.errors import UserError
from vgg.data.datasets import stats as vstats
from vgg.evaluation.methods import eval_scales, train_scale_text
from vgg.models import pretrained as vpretrained
from vgg.models.checkpoint import build_model_from_checkpoint, load_net_checkpoint

# --- Nets ----------------------------------------------------------------------------------------

@dataclass
class EvalNet:
    """A trained net ready for testing, with what its checkpoint says about how it was trained."""

    name: str
    path: Path
    model: nn.Module  # the VGG as trained (multi-crop)
    classes: list[str]
    mean_rgb: list[float]
    crop_size: int
    scale_min: int
    scale_max: int
    scales: list[int]  # the test scales Q
    config: dict  # the run config saved in the checkpoint

    @property
    def train_s(self) -> str:
        return train_scale_text(self.scale_min, self.scale_max)


def default_checkpoint(root="checkpoints") -> Path:
    """The newest `<root>/<run>/best.pt` by modification time."""
    found = sorted(Path(root).glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(f"no checkpoint found under {root}/*/best.pt: train a net first "
                        "(python train.py) or pass --checkpoint PATH")
    return found[-1]


def load_eval_net(path, *, scales=None, single_scale: bool = False) -> EvalNet:
    """Load a checkpoint for testing; the test scales follow its training scales unless `scales` is given.

    `path` may also be a torchvision VGG state dict (.pth) or "torchvision:vgg16" (its published weights,
    vgg.models.pretrained); those take the classes of the data they meet (torchvision's order is sorted wnids).
    """
    if str(path).startswith("torchvision:"):
        tv_name, state_dict = vpretrained.torchvision_state_dict(str(path))
        ckpt = vpretrained.checkpoint_from_state_dict(state_dict, str(path))
        path = Path("checkpoints") / f"torchvision-{tv_name}" / "IMAGENET1K_V1"  # names the results' folder
    else:
        path = Path(path)
        if path.is_dir():
            path = path / "best.pt"
        ckpt = load_net_checkpoint(path, require=EVAL_KEYS)
    model = build_model_from_checkpoint(ckpt, path)
    model.eval()
    config = ckpt.get("config", {})
    crop = model.image_size
    scale_min, scale_max = config.get("scale_min"), config.get("scale_max", config.get("scale_min"))
    if scales:
        too_small = [q for q in scales if q < crop]
        if too_small:
            raise UserError(f"--scales {', '.join(map(str, too_small))} below the net's crop size {crop}: "
                            f"every Q must be >= {crop}")
        test_scales = sorted(set(scales))
    elif scale_min is None:
        raise UserError(f"{path} does not record its training scale (config 'scale_min'): pass --scales")
    else:
        test_scales = eval_scales(scale_min, scale_max, crop, single_scale=single_scale)
    run_name = config.get("run_name") or path.parent.name
    name = model.arch_name if run_name == model.arch_name else f"{model.arch_name} ({run_name})"
    return EvalNet(name=name, path=path, model=model, classes=list(ckpt["classes"]),
                   mean_rgb=list(vstats.DatasetStats.from_dict(ckpt["stats"]).mean_rgb), crop_size=crop,
                   scale_min=scale_min if scale_min is not None else 0,
                   scale_max=scale_max if scale_max is not None else 0, scales=test_scales, config=config)
