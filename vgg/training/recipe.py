"""The paper's optimisation recipe (§3.1): SGD with momentum 0.9 and weight decay 5e-4 (its parameter
groups and kernel), the lr divided by 10 when validation accuracy stops improving.
"""

import torch

from vgg.config import Config
from vgg.core.progress import get_logger

log = get_logger()


def _is_decayed(model, config: Config):
    """name -> whether weight decay applies: to weights always, to biases and batch-norm parameters by choice."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                   for p in m.parameters()}
    return lambda name, p: (config.norm_decay if id(p) in norm_params
                            else config.bias_decay or not name.endswith("bias"))


def build_optimizer(model, config: Config) -> torch.optim.SGD:
    """SGD, momentum 0.9, weight decay 5e-4 (§3.1); decay on biases (and batch-norm parameters, for
    the nets that have them) is a config choice.

    Built after the model is on its device: the update is one fused kernel there (CUDA and CPU), or
    one batched (foreach) update elsewhere; either is the same arithmetic as the plain per-tensor loop.
    """
    is_decayed = _is_decayed(model, config)
    decay = [p for n, p in model.named_parameters() if is_decayed(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not is_decayed(n, p)]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                           **sgd_kernel(next(model.parameters()).device))


FUSED_SGD_DEVICES = ("cuda", "cpu")  # where torch has a fused SGD kernel for float parameters


def sgd_kernel(device: torch.device) -> dict:
    """SGD's fused or foreach flag for parameters on `device` (kept across resume: see restore_training_state)."""
    return {"fused": True} if device.type in FUSED_SGD_DEVICES else {"foreach": True}
