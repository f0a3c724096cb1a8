"""The paper's neighbours (issue 14): each net builds, trains and evaluates through the real CLIs on real
JPEGs (scaled-down data: 3 classes, a few images), torchvision's weights interchange, dense forms, aux losses."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import ROOT, assert_one_line_error, subprocess_env

from vgg.config import Config
from vgg.core.checkpoint import load_checkpoint, save_checkpoint
from vgg.models import zoo as vzoo
from vgg.models.vgg import build_vgg
from vgg.training.recipe import build_optimizer
from vgg.training.step import train_step


@pytest.fixture(scope="module")
def tiny_root(sample_root, tmp_path_factory):
    """3 classes of the sample set, 4 training and 2 validation JPEGs each (sorted, so the same files every run)."""
    root = tmp_path_factory.mktemp("zoo") / "tiny"
    for split, count in (("train", 4), ("val", 2)):
        for wnid in sorted(p.name for p in (sample_root / split).iterdir() if p.is_dir())[5:8]:  # classes without awkward files
            (root / split / wnid).mkdir(parents=True)
            for path in sorted((sample_root / split / wnid).glob("*.JPEG"))[:count]:
                shutil.copy(path, root / split / wnid / path.name)
    return root


def cli(script, *args, timeout=900):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout, cwd=ROOT)


def train_args(config, root, tmp_path, *extra):
    return ["--config", config, "--data", str(root), "--out-dir", str(tmp_path / "checkpoints"),
            "--log-dir", str(tmp_path / "runs"), "--workers", "0", "--device", "cpu", "--batch-size", "2",
            "--steps-per-epoch", "2", "--epochs", "1", "--stats-images", "8", *extra]


# (config, crop and scale flags: scaled down where the net allows, evaluation flags). Multi-crop is
# the same code for every net: it runs on the small-input nets only.
FAMILIES = [
    ("alexnet", ["--scale-min", "240", "--scale-max", "256"], ["--dense", "--scales", "240"]),
    ("googlenet", ["--crop-size", "64", "--scale-min", "64", "--scale-max", "80"], ["--dense", "--multi-crop"]),
    ("resnet18", ["--crop-size", "32", "--scale-min", "36", "--scale-max", "48"], ["--dense", "--multi-crop"]),
    ("inception_v3", ["--scale-min", "299", "--scale-max", "299"], ["--dense"]),
    ("lenet5-demo", [], ["--dense", "--multi-crop"]),
]


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    """config -> its run folder, each family trained once through train.py (2 steps of 2 images)."""
    out, runs = tmp_path_factory.mktemp("zoo-runs"), {}

    def train(config: str, scale_flags: list[str]):
        if config not in runs:
            result = cli("train.py", *train_args(config, tiny_root, out, "--run-name", config, *scale_flags))
            assert result.returncode == 0, result.stderr[-3000:]
            runs[config] = out / "checkpoints" / config
        return runs[config]
    return train


def evaluate(run_dirs, root, out, *flags):
    return cli("evaluate.py", "--checkpoint", *map(str, run_dirs), "--data", str(root), "--workers", "0",
               "--device", "cpu", "--out", str(out), *flags)


@pytest.mark.parametrize("config, scale_flags, eval_flags", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_each_family_trains_and_evaluates_through_the_clis(tiny_root, trained, tmp_path, config, scale_flags,
                                                           eval_flags):
    run_dir = trained(config, scale_flags)
    ckpt = load_checkpoint(run_dir / "last.pt")
    arch = "lenet5" if config == "lenet5-demo" else config
    assert ckpt["arch"]["name"] == arch
    assert ckpt["classes"] == sorted(p.name for p in (tiny_root / "train").iterdir() if p.is_dir())
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    rebuilt = vzoo.build_net_from_kwargs(ckpt["arch"])
    rebuilt.load_state_dict(ckpt["model"])  # strict: the checkpoint rebuilds the very net

    result = evaluate([run_dir], tiny_root, tmp_path / "r", *eval_flags)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    methods = {row["method"] for row in rows}
    assert ("dense" in methods) and (("multi-crop" in methods) == ("--multi-crop" in eval_flags)), methods
    assert all(0 <= row["top1_err"] <= 100 for row in rows)
    assert arch in result.stdout  # the table names the net


def test_fusion_across_families(tiny_root, trained, tmp_path):
    """A ResNet and LeNet-5, trained on the same classes at different input sizes, fuse into one row."""
    runs = [trained(config, flags) for config, flags, _ in FAMILIES if config in ("resnet18", "lenet5-demo")]
    result = evaluate(runs, tiny_root, tmp_path / "fused")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "fused.json").read_text())["rows"]
    fused = [row for row in rows if row["net"].startswith("fusion")]
    assert len(fused) == 1 and "resnet18" in fused[0]["net"] and "lenet5" in fused[0]["net"], rows
    assert len(rows) == 3


def test_vgg_only_steps_are_refused_for_other_nets(tiny_root, tmp_path):
    # §3.1's warm start takes net A into a deeper VGG, not into a ResNet
    a = build_vgg("A", num_classes=3, width=0.125, fc_width=64, image_size=32)
    classes = sorted(p.name for p in (tiny_root / "train").iterdir() if p.is_dir())
    save_checkpoint(tmp_path / "a.pt", model=a.state_dict(), arch=a.arch_kwargs(), classes=classes)
    result = cli("train.py", *train_args("resnet18", tiny_root, tmp_path, "--crop-size", "32", "--scale-min", "36",
                                         "--init-from", str(tmp_path / "a.pt")))
    assert_one_line_error(result, "resnet18", "net A")
    # each net's input size is checked before any data scan, in one line naming what it takes
    result = cli("train.py", *train_args("alexnet", tiny_root, tmp_path, "--crop-size", "64", "--scale-min", "64"))
    assert_one_line_error(result, "crop_size 64", "alexnet", "223..246")
    result = cli("train.py", *train_args("inception_v3", tiny_root, tmp_path, "--crop-size", "224"))
    assert_one_line_error(result, "inception_v3", "299")


@pytest.mark.parametrize("name", ["resnet34", "resnet50", "resnet101", "resnet152"])
def test_deeper_resnets_take_real_optimizer_steps(name):
    torch.manual_seed(0)
    model = vzoo.build_net(name, 3, image_size=32, init="default")
    optimizer = build_optimizer(model, Config(arch=name, crop_size=32, scale_min=32, scale_max=32, lr=0.1,
                                              weight_decay=1e-4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    _, loss = train_step(model, images, labels, optimizer, bf16=False)
    assert torch.isfinite(loss)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "fc.weight" in changed and "conv1.weight" in changed and "bn1.running_mean" in changed


def test_parameter_counts_in_the_readme_are_the_nets():
    """The README's table of nets: every count is the built net's, and for torchvision's nets, torchvision's own."""
    rows = re.findall(r"^\| `([\w-]+)` \| ([\d,]+) \|", (ROOT / "README.md").read_text(), flags=re.M)
    listed = {name: int(count.replace(",", "")) for name, count in rows}
    assert set(listed) == set(vzoo.ARCH_NAMES), set(vzoo.ARCH_NAMES) ^ set(listed)
    for name, count in listed.items():
        assert vzoo.parameter_count(name, 10 if name == "lenet5" else 1000) == count, name
    for name in vzoo.TORCHVISION_ARCHS:
        extra = {"aux_logits": False, "init_weights": False} if name in vzoo.AUX_LOSS_WEIGHT else {}
        with torch.device("meta"):
            theirs = torchvision.models.get_model(name, weights=None, **extra)
        assert sum(p.numel() for p in theirs.parameters()) == listed[name], name
    assert listed["D"] == 138_357_544 and listed["E"] == 143_667_240  # Table 2: 138 M and 144 M


@pytest.mark.parametrize("name, size", [("alexnet", 224), ("googlenet", 64), ("resnet18", 64), ("inception_v3", 299)])
def test_torchvision_weights_interchange(name, size):
    """Our net's state dict is torchvision's, both ways, with identical outputs (aux heads: trained only)."""
    torch.manual_seed(1)
    ours = vzoo.build_net(name, 7, image_size=size, init="default").eval()
    extra = {"aux_logits": True, "init_weights": False} if name in vzoo.AUX_LOSS_WEIGHT else {}
    theirs = torchvision.models.get_model(name, weights=None, num_classes=7, **extra).eval()
    theirs.load_state_dict(ours.state_dict())  # strict
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    # and torchvision's published layout without auxiliary heads loads into our net for testing
    if name in vzoo.AUX_LOSS_WEIGHT:
        published = {k: v for k, v in theirs.state_dict().items() if not vzoo.is_auxiliary(k)}
        missing = ours.load_state_dict(published, strict=False).missing_keys
        assert missing and all(vzoo.is_auxiliary(k) for k in missing)


@pytest.mark.parametrize("name, size", [("alexnet", 224), ("lenet5", 32), ("resnet18", 64), ("googlenet", 64)])
def test_dense_form_at_the_training_crop_equals_the_net(name, size):
    torch.manual_seed(2)
    model = vzoo.build_net(name, 5, image_size=size, init="default").eval()
    dense = vzoo.to_dense(model).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        scores = dense(x)
        assert scores.shape == (2, 5, 1, 1)
        assert torch.allclose(scores.flatten(1), model(x), atol=1e-5)
        bigger = dense(torch.randn(1, 3, size + 64, size + 32))
    # FC -> conv nets slide over a bigger image (one score per position); global-pool nets average it all
    expected = (1, 1) if name in vzoo.GLOBAL_POOL_ARCHS else None
    assert bigger.shape[-2:] == expected if expected else (bigger.shape[-2] > 1 and bigger.shape[-1] > 1)


def test_auxiliary_losses_are_weighted_as_their_papers_say():
    torch.manual_seed(3)
    labels = torch.tensor([0, 2])
    main, aux2, aux1 = torch.randn(3, 2, 4).unbind(0)
    outputs = torchvision.models.GoogLeNetOutputs(main, aux2, aux1)
    expected = F.cross_entropy(main, labels) + 0.3 * (F.cross_entropy(aux2, labels) + F.cross_entropy(aux1, labels))
    assert torch.allclose(vzoo.training_loss(outputs, labels), expected)
    outputs = torchvision.models.InceptionOutputs(main, aux1)
    expected = F.cross_entropy(main, labels) + 0.4 * F.cross_entropy(aux1, labels)
    assert torch.allclose(vzoo.training_loss(outputs, labels), expected)
    assert torch.equal(vzoo.training_loss(main, labels), F.cross_entropy(main, labels))
    assert vzoo.main_logits(outputs) is main


def test_batch_norm_weight_decay_is_a_choice():
    model = vzoo.build_net("resnet18", 3, image_size=32, init="default")
    norm = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    for norm_decay in (True, False):
        groups = build_optimizer(model, Config(arch="resnet18", crop_size=32, scale_min=32, scale_max=32,
                                               weight_decay=1e-4, norm_decay=norm_decay)).param_groups
        decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
        assert (norm <= decayed) == norm_decay and (not norm & decayed) == (not norm_decay)
        assert id(model.conv1.weight) in decayed and id(model.fc.weight) in decayed
        in_groups = [id(p) for g in groups for p in g["params"]]
        assert sorted(in_groups) == sorted(id(p) for p in model.parameters())  # each trained, once


def test_lenet5_is_lecuns_layout():
    model = vzoo.build_net("lenet5", 10, image_size=32, dropout=0.0, init="default")
    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert shapes == [(6, 3, 5, 5), (16, 6, 5, 5), (120, 16, 5, 5), (84, 120), (10, 84)]  # C1 C3 C5 F6 output
    conv = model.features[1]
    assert conv.weight.abs().max() <= 2.4 / 75 and conv.weight.abs().max() > 2.0 / 75  # +-2.4 / fan-in
    activation = vzoo.ScaledTanh()
    assert torch.allclose(activation(torch.tensor([1.0, -1.0])), torch.tensor([1.0, -1.0]), atol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "googlenet", "alexnet"])
@pytest.mark.parametrize("scheme", ["normal", "xavier"])
def test_the_papers_init_schemes_apply_to_every_family(name, scheme):
    """--init normal/xavier (§3.1) on nets whose convs have no bias (ResNet, GoogLeNet) as on those that do."""
    torch.manual_seed(0)
    model = vzoo.build_net(name, num_classes=5, image_size=224 if name != "googlenet" else 64, init=scheme)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert any(m.bias is None for m in layers) == (name != "alexnet")
    for m in layers:
        bound = 0.01 if scheme == "normal" else (6 / (m.weight[0].numel() + m.weight.shape[0] * m.weight[0, 0].numel())) ** 0.5
        if scheme == "normal" and m.weight.numel() > 1000:
            assert abs(m.weight.std().item() - 0.01) < 0.002
        if scheme == "xavier":
            assert m.weight.abs().max().item() <= bound + 1e-6
        assert m.bias is None or not m.bias.any()
