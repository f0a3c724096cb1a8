"""The nets of Table 1: structure, parameter counts (Table 2), torchvision interop, init, warm start, dense."""

import pytest
import torch
import torch.nn as nn
import torchvision

from vgg.errors import UserError
from vgg.models import (CFGS, VGG, build_vgg, from_torchvision_state_dict, init_weights, to_dense,
                        to_torchvision_state_dict, warm_start)

PARAMS = {"A": 132_863_336, "A-LRN": 132_863_336, "B": 133_047_848, "C": 133_638_952,
          "D": 138_357_544, "E": 143_667_240}
SMALL = dict(width=1 / 16, fc_width=64, image_size=32)


def small(name, **kw):
    return build_vgg(name, num_classes=10, **{**SMALL, **kw})


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts_match_table_2(name):
    with torch.device("meta"):
        model = VGG(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", list(CFGS))
def test_layer_structure_follows_table_1(name):
    with torch.device("meta"):
        model = VGG(name)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    weight_layers = {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}[name]
    assert len(convs) + 3 == weight_layers  # Table 1's depth counts the convs and the 3 FC layers
    assert sum(isinstance(m, nn.MaxPool2d) and m.kernel_size == 2 and m.stride == 2 for m in model.features) == 5
    for conv in convs:
        assert conv.stride == (1, 1)
        assert conv.kernel_size in ((3, 3), (1, 1)) and conv.padding == (conv.kernel_size[0] // 2,) * 2
    assert sum(c.kernel_size == (1, 1) for c in convs) == (3 if name == "C" else 0)
    # every conv is followed by a ReLU
    layers = list(model.features)
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Conv2d):
            assert isinstance(layers[i + 1], nn.ReLU)
    lrns = [m for m in model.features if isinstance(m, nn.LocalResponseNorm)]
    if name == "A-LRN":
        assert len(lrns) == 1 and (lrns[0].size, lrns[0].alpha, lrns[0].beta, lrns[0].k) == (5, 1e-4, 0.75, 2)
        assert layers.index(lrns[0]) == 2  # right after the first conv + ReLU
    else:
        assert not lrns
    kinds = [type(m) for m in model.classifier]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert [m.out_features for m in model.classifier if isinstance(m, nn.Linear)] == [4096, 4096, 1000]
    assert all(m.p == 0.5 for m in model.classifier if isinstance(m, nn.Dropout))


@pytest.mark.parametrize("name", list(CFGS))
def test_small_nets_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = small(name, init="xavier")
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    logits.sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_torchvision_weights_move_both_ways_with_the_same_logits():
    torch.manual_seed(0)
    ours = build_vgg("D").eval()
    theirs = torchvision.models.vgg16(weights=None).eval()
    theirs.load_state_dict(to_torchvision_state_dict(ours.state_dict(), "D"), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
    for name, tv_name in {"A": "vgg11", "B": "vgg13", "E": "vgg19"}.items():
        with torch.device("meta"):
            tv = getattr(torchvision.models, tv_name)(weights=None)
            net = VGG(name)
        net.load_state_dict(from_torchvision_state_dict(tv.state_dict(), name), strict=True, assign=True)
        tv.load_state_dict(to_torchvision_state_dict(net.state_dict(), name), strict=True, assign=True)
    with pytest.raises(UserError, match="no torchvision counterpart"):
        to_torchvision_state_dict({}, "C")


def test_width_and_fc_width_scale_the_same_code():
    model = build_vgg("D", num_classes=10, width=0.25, fc_width=128, image_size=64)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs][:3] == [16, 16, 32]
    assert model.classifier[0].in_features == 128 * 2 * 2 and model.classifier[0].out_features == 128
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert build_vgg(**model.arch_kwargs()).state_dict().keys() == model.state_dict().keys()


def test_init_schemes():
    torch.manual_seed(0)
    model = build_vgg("A", num_classes=10, width=0.5, fc_width=512, image_size=64, init="normal")
    fc = model.classifier[0].weight
    assert abs(fc.std().item() - 0.01) < 5e-4 and abs(fc.mean().item()) < 5e-4
    assert all((m.bias == 0).all() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    init_weights(model, "xavier")
    bound = (6 / (fc.shape[0] + fc.shape[1])) ** 0.5
    assert fc.abs().max() <= bound and fc.std() > 0.5 * bound / 3**0.5
    with pytest.raises(UserError, match="allowed: normal, xavier"):
        init_weights(model, "kaiming")


@pytest.mark.parametrize("name", ["B", "C", "D", "E"])
def test_warm_start_copies_first_four_convs_and_fc_layers_of_net_a(name):
    torch.manual_seed(0)
    source = small("A")
    target = small(name)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    copied = warm_start(target, source)
    src_convs = [i for i, m in enumerate(source.features) if isinstance(m, nn.Conv2d)][:4]
    tgt_convs = [i for i, m in enumerate(target.features) if isinstance(m, nn.Conv2d)]
    # stage 1 conv 1, stage 2 conv 1, stage 3 convs 1 and 2: conv numbers 0, 2, 4, 5 in B-E
    per_stage = [0, 2, 4, 5]
    expected = {f"features.{tgt_convs[j]}.{s}" for j in per_stage for s in ("weight", "bias")}
    expected |= {f"classifier.{i}.{s}" for i in (0, 3, 6) for s in ("weight", "bias")}
    assert set(copied) == expected
    src_keys = [f"features.{i}" for i in src_convs]
    after = target.state_dict()
    for j, src in zip(per_stage, src_keys):
        assert torch.equal(after[f"features.{tgt_convs[j]}.weight"], source.state_dict()[f"{src}.weight"])
    for key, value in after.items():
        if key not in expected:
            assert torch.equal(value, before[key]), key  # the layers in between stay as initialised
    with pytest.raises(UserError):
        warm_start(target, small("B"))
    with pytest.raises(UserError, match="shape"):
        warm_start(small(name, fc_width=32), source)


def test_dense_net_equals_fc_net_at_crop_size_and_takes_bigger_images():
    torch.manual_seed(0)
    model = small("D").eval()
    dense = to_dense(model).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        score_map = dense(x)
        assert score_map.shape == (2, 10, 1, 1)
        torch.testing.assert_close(score_map.flatten(1), model(x), rtol=1e-5, atol=1e-6)
        assert dense(torch.randn(1, 3, 96, 64)).shape == (1, 10, 3, 2)
    full = to_dense(build_vgg("A"))
    assert full.classifier[0].kernel_size == (7, 7) and full.classifier[3].kernel_size == (1, 1)
    assert full.min_input_size == 224


def test_clear_errors_for_unknown_names_and_small_inputs():
    with pytest.raises(UserError, match="unknown VGG configuration 'F'; allowed: A, A-LRN, B, C, D, E"):
        build_vgg("F")
    dense = to_dense(small("A"))
    with pytest.raises(UserError, match="at least 32x32"):
        dense(torch.randn(1, 3, 31, 64))
    with pytest.raises(UserError, match="takes 32x32 inputs"):
        small("A")(torch.randn(1, 3, 64, 64))
