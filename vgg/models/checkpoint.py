"""A net from a checkpoint: rebuild the net a checkpoint names and load its weights; torchvision's bare
state dicts (vgg11/13/16/19 .pth files) taken as checkpoints, their normalisation folded in.
"""

from pathlib import Path

from vgg.core.checkpoint import MODEL_KEYS, check_checkpoint, read_checkpoint_file, strip_wrapper_prefixes
from vgg.core.errors import UserError
from vgg.models import pretrained
from vgg.models.vgg import VGG
from vgg.models.zoo import build_net_from_kwargs


def build_model_from_checkpoint(ckpt: dict, path="checkpoint") -> VGG:
    """Rebuild the net the checkpoint was trained as and load its weights; UserError if they do not fit."""
    try:
        model = build_net_from_kwargs(ckpt["arch"])
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"{path}: cannot build the net it names ({ckpt['arch']}): {e}") from None
    load_model_state(model, ckpt["model"], path)
    return model


def load_model_state(model: VGG, state: dict, path) -> None:
    """model.load_state_dict (of a checkpoint's prefix-free "model"), a misfit as one line naming the file."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        reason = " ".join(str(e).split())
        if len(reason) > 300:
            reason = reason[:300] + " ..."
        raise UserError(f"{path}: its weights do not fit net {model.arch_name} ({model.arch_kwargs()}): "
                        f"{reason}") from None


def load_net_checkpoint(path, map_location="cpu", require=MODEL_KEYS) -> dict:
    """`vgg.core.checkpoint.load_checkpoint`, and a torchvision vgg11/13/16/19 state dict taken as a
    checkpoint of the same net (its input normalisation folded into the first conv, vgg.models.pretrained)."""
    path = Path(path)
    ckpt = read_checkpoint_file(path, map_location)
    if pretrained.is_bare_state_dict(ckpt):
        ckpt = pretrained.checkpoint_from_state_dict(strip_wrapper_prefixes(ckpt), f"{path.name}")
    return check_checkpoint(ckpt, path, require)
