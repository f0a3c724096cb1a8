"""The nets of Table 1: structure, parameter counts (Table 2), torchvision interop, init, warm start, dense."""

import re

import pytest
import torch
import torch.nn as nn
import torchvision

from vgg.core.errors import UserError
from vgg.models.vgg import (
    CFGS,
    VGG,
    build_vgg,
    from_torchvision_state_dict,
    init_weights,
    make_layers,
    to_dense,
    to_torchvision_state_dict,
    warm_start,
)

PARAMS = {"A": 132_863_336, "A-LRN": 132_863_336, "B": 133_047_848, "C": 133_638_952,
          "D": 138_357_544, "E": 143_667_240}
DEPTH = {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}  # Table 1's weight layers
SMALL = dict(width=1 / 16, fc_width=64, image_size=32)


def small(name, **kw):
    return build_vgg(name, num_classes=10, **{**SMALL, **kw})


def meta(name, **kw):
    """A full-size net without memory or init cost: for counting and inspecting only."""
    with torch.device("meta"):
        return VGG(name, **kw)


def test_configurations_are_table_1():
    assert list(CFGS) == ["A", "A-LRN", "B", "C", "D", "E"]
    assert CFGS["D"] == [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3]
    assert CFGS["C"][2] == [256, 256, (256, 1)]  # C's third conv of stages 3-5 is 1x1


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts_match_table_2(name):
    assert sum(p.numel() for p in meta(name).parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", list(CFGS))
def test_layer_structure_follows_table_1(name):
    model = meta(name)
    layers = list(model.features)
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    assert len(convs) + 3 == DEPTH[name]
    pools = [m for m in layers if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 5 and all(p.kernel_size == 2 and p.stride == 2 for p in pools)
    assert isinstance(layers[-1], nn.MaxPool2d)
    for conv in convs:
        assert conv.stride == (1, 1)
        assert conv.kernel_size in ((3, 3), (1, 1)) and conv.padding == (conv.kernel_size[0] // 2,) * 2
    one_by_one = [i for i, c in enumerate(convs) if c.kernel_size == (1, 1)]
    assert one_by_one == ([6, 9, 12] if name == "C" else [])  # the last conv of stages 3, 4, 5
    # widths per stage: 64, 128, 256, 512, 512 (Table 1)
    stage_widths, stage = [], []
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            stage.append(layer.out_channels)
        elif isinstance(layer, nn.MaxPool2d):
            stage_widths.append(set(stage))
            stage = []
    assert stage_widths == [{64}, {128}, {256}, {512}, {512}]
    for i, layer in enumerate(layers):  # every conv is followed by a ReLU
        if isinstance(layer, nn.Conv2d):
            assert isinstance(layers[i + 1], nn.ReLU)
    lrns = [m for m in layers if isinstance(m, nn.LocalResponseNorm)]
    if name == "A-LRN":
        # torch's alpha is AlexNet's alpha (1e-4) times n (see test_a_lrn_is_alexnets_formula)
        assert len(lrns) == 1 and (lrns[0].size, lrns[0].alpha, lrns[0].beta, lrns[0].k) == (5, 5e-4, 0.75, 2)
        assert layers.index(lrns[0]) == 2  # right after the first conv + ReLU
    else:
        assert not lrns
    kinds = [type(m) for m in model.classifier]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert [(m.in_features, m.out_features) for m in model.classifier if isinstance(m, nn.Linear)] == [
        (512 * 7 * 7, 4096), (4096, 4096), (4096, 1000)]
    assert all(m.p == 0.5 for m in model.classifier if isinstance(m, nn.Dropout))
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())


@pytest.mark.parametrize("name", list(CFGS))
def test_small_nets_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = small(name, init="xavier")
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    logits.logsumexp(dim=1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_torchvision_weights_move_both_ways_with_the_same_logits():
    torch.manual_seed(0)
    theirs = torchvision.models.vgg16(weights=None).eval()  # torchvision's own (Kaiming) init
    ours = meta("D").eval()  # no init of its own: it takes torchvision's tensors
    ours.load_state_dict(from_torchvision_state_dict(theirs.state_dict()), strict=True, assign=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        logits = ours(x)
        torch.testing.assert_close(logits, theirs(x), rtol=1e-4, atol=1e-5)
    assert logits.std() > 0
    back = to_torchvision_state_dict(ours.state_dict(), "D")
    for key, value in theirs.state_dict().items():
        assert torch.equal(back[key], value), key
    with torch.device("meta"):
        again = torchvision.models.vgg16(weights=None)
    again.load_state_dict(back, strict=True, assign=True)
    # the other twins, on the meta device: keys and shapes load strictly both ways
    for name, tv_name in {"A": "vgg11", "B": "vgg13", "E": "vgg19"}.items():
        with torch.device("meta"):
            tv = getattr(torchvision.models, tv_name)(weights=None)
            net = VGG(name)
        net.load_state_dict(from_torchvision_state_dict(tv.state_dict()), strict=True, assign=True)
        tv.load_state_dict(to_torchvision_state_dict(net.state_dict(), name), strict=True, assign=True)


def test_torchvision_conversion_refuses_nets_without_a_twin():
    for name in ("C", "A-LRN"):
        state = meta(name).state_dict()
        with pytest.raises(UserError, match=f"net {name} has no torchvision counterpart"):
            to_torchvision_state_dict(state)  # found from the layers: C has D's keys but 1x1 kernels
        with pytest.raises(UserError, match="no torchvision counterpart"):
            from_torchvision_state_dict(state, name)
    with pytest.raises(UserError, match="not a state dict of net D"):
        to_torchvision_state_dict(meta("C").state_dict(), "D")
    with pytest.raises(UserError, match="not a state dict of net B"):
        from_torchvision_state_dict(meta("A").state_dict(), "B")
    with pytest.raises(UserError, match="not a state dict of VGG"):
        from_torchvision_state_dict({"fc.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="allowed: A, A-LRN, B, C, D, E"):
        from_torchvision_state_dict(meta("A").state_dict(), "vgg11")


def test_width_and_fc_width_scale_the_same_code():
    model = build_vgg("D", num_classes=10, width=0.25, fc_width=128, image_size=64)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64, 64] + [128] * 6
    assert model.classifier[0].in_features == 128 * 2 * 2 and model.classifier[0].out_features == 128
    assert model.classifier[3].in_features == 128 and model.classifier[6].out_features == 10
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    tiny = meta("E", width=1 / 1024)
    assert all(m.out_channels == 1 for m in tiny.features if isinstance(m, nn.Conv2d))  # at least 1 channel


def test_arch_kwargs_rebuild_the_same_net():
    model = build_vgg("C", num_classes=7, width=0.125, fc_width=48, image_size=96, dropout=0.25, init="xavier")
    kwargs = model.arch_kwargs()
    assert kwargs == {"name": "C", "num_classes": 7, "width": 0.125, "fc_width": 48, "image_size": 96,
                      "dropout": 0.25}
    rebuilt = build_vgg(**kwargs)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert rebuilt.arch_kwargs() == kwargs
    assert (rebuilt.arch_name, rebuilt.image_size, rebuilt.num_classes) == ("C", 96, 7)


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="unknown VGG configuration 'F'; allowed: A, A-LRN, B, C, D, E"):
        build_vgg("F")
    for image_size in (0, 16, 100, 230):
        with pytest.raises(UserError, match=f"multiple of 32.*got {image_size}"):
            build_vgg("A", image_size=image_size)
    with pytest.raises(UserError, match="width"):
        build_vgg("A", width=0)
    with pytest.raises(UserError, match="fc_width"):
        build_vgg("A", fc_width=0)
    with pytest.raises(UserError, match="num_classes"):
        build_vgg("A", num_classes=0)
    with pytest.raises(UserError, match="dropout"):
        build_vgg("A", dropout=1.0)
    with pytest.raises(UserError, match="unknown init 'kaiming'; allowed: normal, xavier"):
        build_vgg("A", init="kaiming")


def test_forward_takes_only_the_training_crop():
    model = small("A")
    with pytest.raises(UserError, match=r"takes 32x32 inputs, got \(64, 64\).*to_dense"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(UserError, match="takes 32x32"):
        model(torch.randn(1, 3, 32, 64))


def test_init_schemes():
    torch.manual_seed(0)
    model = build_vgg("A", num_classes=10, width=0.5, fc_width=512, image_size=64, init="normal")
    big = [model.classifier[0].weight, model.features[model.conv_index[(4, 1)]].weight]  # 1M and 600k weights
    for weight in big:
        assert abs(weight.std().item() - 0.01) < 2e-4 and abs(weight.mean().item()) < 1e-4
    biases = [m.bias for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(biases) == 11 and all((b == 0).all() for b in biases)
    for p in model.parameters():
        p.data.fill_(1.0)
    init_weights(model, "xavier")
    assert all((b == 0).all() for b in biases)
    fc = model.classifier[0].weight
    bound = (6 / (fc.shape[0] + fc.shape[1])) ** 0.5  # Glorot uniform: U(-bound, bound), std bound/sqrt(3)
    assert fc.abs().max() <= bound and abs(fc.std().item() - bound / 3**0.5) < 0.02 * bound
    conv = model.features[0].weight  # fan_in 27, fan_out 288
    conv_bound = (6 / (27 + 32 * 9)) ** 0.5
    assert conv.abs().max() <= conv_bound and conv.abs().max() > 0.9 * conv_bound
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
    assert all(target.features[tgt_convs[j]].kernel_size == (3, 3) for j in per_stage)  # C's 1x1 is conv 6
    pairs = [(f"features.{tgt_convs[j]}", f"features.{src}") for j, src in zip(per_stage, src_convs)]
    pairs += [(f"classifier.{i}", f"classifier.{i}") for i in (0, 3, 6)]
    expected = [f"{t}.{s}" for t, _ in pairs for s in ("weight", "bias")]
    assert sorted(copied) == sorted(expected) and len(copied) == 14
    after, src_state = target.state_dict(), source.state_dict()
    for t, s in pairs:
        for suffix in ("weight", "bias"):
            assert torch.equal(after[f"{t}.{suffix}"], src_state[f"{s}.{suffix}"])
        assert not torch.equal(after[f"{t}.weight"], before[f"{t}.weight"])  # it did change
    for key, value in after.items():
        if key not in expected:
            assert torch.equal(value, before[key]), key  # the layers in between stay as initialised


def test_warm_start_refuses_a_mismatched_source_and_copies_nothing():
    torch.manual_seed(0)
    target = small("D")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(UserError, match="takes net A as its source, got net B"):
        warm_start(target, small("B"))
    with pytest.raises(UserError, match="shape"):
        warm_start(target, small("A", width=1 / 8))
    with pytest.raises(UserError, match="classifier.6.weight"):
        warm_start(target, build_vgg("A", num_classes=11, **SMALL))
    with pytest.raises(UserError, match="classifier.0.weight"):
        warm_start(target, small("A", image_size=64))
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_dense_net_equals_fc_net_at_crop_size_and_slides_over_bigger_images():
    torch.manual_seed(0)
    # image_size 64 makes FC1 a 2x2 conv, so the kernel layout of the reshaped weights is checked
    model = build_vgg("D", num_classes=10, width=1 / 16, fc_width=64, image_size=64, init="xavier").eval()
    dense = to_dense(model).eval()
    assert dense.min_input_size == 64 and dense.classifier[0].kernel_size == (2, 2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        score_map = dense(x)
        assert score_map.shape == (2, 10, 1, 1)
        torch.testing.assert_close(score_map.flatten(1), model(x), rtol=1e-5, atol=1e-5)
        big = torch.randn(1, 3, 128, 96)
        score_map = dense(big)
        assert score_map.shape == (1, 10, 3, 2) and torch.isfinite(score_map).all()
        # each map cell is the FC classifier applied to one 2x2 window of the feature map
        features = model.features(big)
        for i in range(3):
            for j in range(2):
                window = features[:, :, i:i + 2, j:j + 2].flatten(1)
                torch.testing.assert_close(score_map[:, :, i, j], model.classifier(window), rtol=1e-5, atol=1e-5)
    # a copy: changing the FC net afterwards leaves the dense net alone
    with torch.no_grad():
        model.features[0].weight.zero_()
    assert dense.features[0].weight.abs().sum() > 0


def test_dense_net_of_a_full_size_net():
    with torch.device("meta"):
        dense = to_dense(VGG("A", dropout=0.3))
    assert dense.min_input_size == 224
    assert [m.kernel_size for m in dense.classifier if isinstance(m, nn.Conv2d)] == [(7, 7), (1, 1), (1, 1)]
    assert [type(m) for m in dense.classifier] == [nn.Conv2d, nn.ReLU, nn.Dropout, nn.Conv2d, nn.ReLU,
                                                   nn.Dropout, nn.Conv2d]
    assert all(m.p == 0.3 for m in dense.classifier if isinstance(m, nn.Dropout))
    assert sum(p.numel() for p in dense.parameters()) == PARAMS["A"]


def test_dense_net_refuses_inputs_smaller_than_the_crop():
    dense = to_dense(small("A"))
    for shape in ((31, 64), (64, 31), (16, 16)):
        with pytest.raises(UserError, match=r"needs inputs of at least 32x32 .*got \(%d, %d\)" % shape):
            dense(torch.randn(1, 3, *shape))


def test_a_lrn_is_alexnets_formula():
    """§2.3 takes AlexNet's LRN: b_i = a_i / (k + alpha * sum_{j=i-n/2}^{i+n/2} a_j^2)^beta, k=2, n=5,
    alpha=1e-4, beta=0.75 -- with no division by n (torch's layer divides, so alpha must be 5x)."""
    lrn = next(m for m in build_vgg("A-LRN", num_classes=3, width=1 / 8, fc_width=8, image_size=32).features
               if isinstance(m, nn.LocalResponseNorm))
    torch.manual_seed(0)
    a = torch.rand(2, 8, 3, 4) * 50  # ReLU outputs are >= 0; large enough for the norm to matter
    k, n, alpha, beta = 2.0, 5, 1e-4, 0.75
    expected = torch.empty_like(a)
    channels = a.shape[1]
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        expected[:, i] = a[:, i] / (k + alpha * (a[:, lo:hi + 1] ** 2).sum(dim=1)) ** beta
    torch.testing.assert_close(lrn(a), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(lrn(a), a / (k + alpha / n * (a ** 2)) ** beta)  # the normalisation bites


@pytest.mark.parametrize("q, positions", [(48, 2), (36, 2), (64, 2), (65, 3), (100, 4)])
def test_dense_score_map_covers_the_whole_image_at_any_q(q, positions):
    """§3.2 with Caffe's ceil pooling: ceil(Q/32) - crop/32 + 1 positions a side, the last seeing the border."""
    torch.manual_seed(0)
    model = build_vgg("A", num_classes=5, width=1 / 16, fc_width=16, image_size=32, init="xavier").eval()
    dense = to_dense(model).eval()
    image = torch.randn(1, 3, q, q)
    with torch.no_grad():
        score_map = dense(image)
        assert score_map.shape[-2:] == (positions, positions) == (-(-q // 32) - 32 // 32 + 1,) * 2
        touched = image.clone()
        touched[..., -1, -1] += 100.0  # the bottom-right pixel alone
        changed = (dense(touched) - score_map).abs().amax(dim=1)[0]
    assert changed[-1, -1] > 0  # the last position sees the border pixel


# --- Protocol details a user relies on (issue 18's mutation audit) ----------------------------------

def test_defaults_are_the_papers_net():
    """VGG and build_vgg default to Table 1's full-size net for ILSVRC: 1000 classes, FC-4096, 224 crop, dropout 0.5."""
    paper = {"name": "D", "num_classes": 1000, "width": 1.0, "fc_width": 4096, "image_size": 224, "dropout": 0.5}
    assert meta("D").arch_kwargs() == paper
    with torch.device("meta"):
        assert build_vgg("D").arch_kwargs() == paper
        features, _, channels = make_layers(CFGS["A"])  # full width unless told
    assert channels == 512 and [m.out_channels for m in features if isinstance(m, nn.Conv2d)][:2] == [64, 128]
    torch.manual_seed(0)
    fc = nn.Linear(1000, 1000)
    init_weights(fc)  # N(0, 0.01^2) unless told (§3.1)
    assert abs(fc.weight.std().item() - 0.01) < 2e-4 and (fc.bias == 0).all()


def test_the_smallest_allowed_nets_build():
    """One class, one hidden unit, the 32-pixel crop and no dropout are all allowed."""
    net = meta("A", num_classes=1, fc_width=1, image_size=32, dropout=0.0)
    assert [(m.in_features, m.out_features) for m in net.classifier if isinstance(m, nn.Linear)] == [
        (512, 1), (1, 1), (1, 1)]


def test_build_vgg_initialises_with_the_scheme_asked_for():
    torch.manual_seed(0)
    default = build_vgg("A", num_classes=10, width=0.5, fc_width=512, image_size=64)  # N(0, 0.01^2) (§3.1)
    assert abs(default.classifier[0].weight.std().item() - 0.01) < 2e-4
    xavier = build_vgg("A", num_classes=10, width=0.5, fc_width=512, image_size=64, init="xavier")
    conv = xavier.features[0].weight  # fan_in 27, fan_out 32 * 9
    bound = (6 / (27 + 32 * 9)) ** 0.5
    assert 0.9 * bound < conv.abs().max() <= bound
    assert all((m.bias == 0).all() for m in xavier.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_dropout_acts_in_training_only_with_the_rate_asked_for():
    torch.manual_seed(0)
    model = small("A", dropout=0.25, init="xavier")
    assert [m.p for m in model.classifier if isinstance(m, nn.Dropout)] == [0.25, 0.25]
    x = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))  # a fresh dropout mask each forward
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    no_dropout = small("A", dropout=0.0)  # 0 is allowed: no dropout at all
    no_dropout.train()
    train_out = no_dropout(x)
    no_dropout.eval()
    torch.testing.assert_close(train_out, no_dropout(x))


def test_dense_net_keeps_the_nets_dtype_and_facts():
    torch.manual_seed(0)
    model = small("B", init="xavier").double().eval()
    dense = to_dense(model).eval()
    assert (dense.arch_name, dense.num_classes, dense.min_input_size) == ("B", 10, 32)
    assert all(p.dtype == torch.float64 for p in dense.parameters())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(dense(x).flatten(1), model(x))


def test_state_dict_conversion_returns_a_copy_of_the_mapping():
    state = meta("A").state_dict()
    for convert in (from_torchvision_state_dict, to_torchvision_state_dict):
        converted = convert(state)
        assert converted == state and converted is not state


def message(text):
    """A UserError's whole message, as one line."""
    return "^" + re.escape(text) + "$"


def test_every_refusal_is_one_exact_line():
    cases = [
        (lambda: build_vgg("F"), "unknown VGG configuration 'F'; allowed: A, A-LRN, B, C, D, E"),
        (lambda: meta("F"), "unknown VGG configuration 'F'; allowed: A, A-LRN, B, C, D, E"),
        (lambda: meta("A", image_size=100),
         "image_size must be a multiple of 32 (five 2x2 max-pools) and at least 32, got 100"),
        (lambda: meta("A", image_size=64.0),
         "image_size must be a multiple of 32 (five 2x2 max-pools) and at least 32, got 64.0"),
        (lambda: meta("A", width=0), "width must be a positive channel multiplier (1.0 is the paper's), got 0"),
        (lambda: meta("A", width=-1.0), "width must be a positive channel multiplier (1.0 is the paper's), got -1.0"),
        (lambda: meta("A", fc_width=0), "fc_width must be a positive integer (4096 is the paper's), got 0"),
        (lambda: meta("A", fc_width=64.0), "fc_width must be a positive integer (4096 is the paper's), got 64.0"),
        (lambda: meta("A", num_classes=0), "num_classes must be a positive integer, got 0"),
        (lambda: meta("A", num_classes=10.0), "num_classes must be a positive integer, got 10.0"),
        (lambda: meta("A", dropout=1.0), "dropout must be in [0, 1) (0.5 is the paper's), got 1.0"),
        (lambda: meta("A", dropout=-0.1), "dropout must be in [0, 1) (0.5 is the paper's), got -0.1"),
        (lambda: build_vgg("A", init="kaiming"), "unknown init 'kaiming'; allowed: normal, xavier"),
        (lambda: init_weights(nn.Linear(2, 2), "Normal"), "unknown init 'Normal'; allowed: normal, xavier"),
        (lambda: small("A")(torch.zeros(1, 3, 64, 32)),
         "net A takes 32x32 inputs, got (64, 32); use to_dense(net) for other sizes (§3.2)"),
        (lambda: small("A")(torch.zeros(3, 64, 32)),  # an unbatched image
         "net A takes 32x32 inputs, got (64, 32); use to_dense(net) for other sizes (§3.2)"),
        (lambda: to_dense(small("C"))(torch.zeros(1, 3, 31, 64)),
         "dense net C needs inputs of at least 32x32 (its training crop), got (31, 64)"),
        (lambda: to_dense(small("C"))(torch.zeros(3, 16, 64)),  # an unbatched image, as torch's convs allow
         "dense net C needs inputs of at least 32x32 (its training crop), got (16, 64)"),
        (lambda: warm_start(small("D"), small("B")), "warm start takes net A as its source, got net B"),
        (lambda: warm_start(small("D"), nn.Identity()), "warm start takes net A as its source, got net Identity()"),
        (lambda: warm_start(small("D"), small("A", width=1 / 8)),
         "warm start: features.0.weight of net A has shape (8, 3, 3, 3), features.0.weight of net D (4, 3, 3, 3) "
         "(same width, fc_width, image_size and num_classes needed)"),
        (lambda: from_torchvision_state_dict({k: torch.zeros(1) for k in "abcde"}),
         "not a state dict of VGG net A, A-LRN, B, C, D or E (keys: a, b, c, d, ...)"),
        (lambda: to_torchvision_state_dict(meta("C").state_dict()),
         "net C has no torchvision counterpart; only A (vgg11), B (vgg13), D (vgg16), E (vgg19) do"),
        (lambda: from_torchvision_state_dict(meta("B").state_dict(), "D"),
         "not a state dict of net D / torchvision vgg16"),
    ]
    for call, text in cases:
        with pytest.raises(UserError, match=message(text)):
            call()
