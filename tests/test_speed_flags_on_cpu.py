"""The CUDA speed settings, run where CI can: fused SGD, DDP's bucket views, and bf16 autocast,
channels-last and torch.compile asked for on the CPU (alone and under 2-process gloo DDP), then the
checkpoint they write resumed and evaluated."""

import copy

import torch

from test_recipe import small_net
from vgg import trainer as vtrainer
from vgg.config import Config
from vgg.engine import train_step


def test_fused_sgd_steps_equal_the_plain_per_tensor_loop():
    model = small_net()
    initial, plain_model = copy.deepcopy(model.state_dict()), copy.deepcopy(model)
    config = Config(bias_decay=False)  # two groups: with and without weight decay
    optimizer = vtrainer.build_optimizer(model, config)
    assert all(group["fused"] for group in optimizer.param_groups)  # CPU has the fused kernel
    decay = [p for n, p in plain_model.named_parameters() if not n.endswith("bias")]
    biases = [p for n, p in plain_model.named_parameters() if n.endswith("bias")]
    plain = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": biases, "weight_decay": 0.0}],
                            lr=0.01, momentum=0.9, foreach=False, fused=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        images = torch.randn(8, 3, 32, 32, generator=g) * 60
        labels = torch.randint(0, 6, (8,), generator=g)
        train_step(model, images, labels, optimizer, bf16=False)
        train_step(plain_model, images, labels, plain, bf16=False)
    moved = 0
    for (name, p), q in zip(model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
        moved += not torch.equal(p, initial[name])
    assert moved == len(list(model.parameters()))  # every tensor took real steps
