"""torchvision's VGG weights evaluated and fine-tuned the paper's way (issue 11): a random torchvision vgg16
state dict in a file and planted in a temporary TORCH_HOME cache gives the same logits through our
pipeline (0-255 pixels minus the mean) as torchvision's own model with its own preprocessing."""

import json
import shutil
import subprocess
import sys
import urllib.error

import pytest
import torch
import torchvision
from conftest import ROOT, subprocess_env

from vgg.core.errors import UserError
from vgg.data.batches.transforms import normalize
from vgg.evaluation.nets import load_eval_net
from vgg.models import pretrained as vpretrained
from vgg.models.checkpoint import load_net_checkpoint
from vgg.models.vgg import build_vgg
from vgg.training.resume import init_from_checkpoint

MEAN, STD = torch.tensor(vpretrained.TORCHVISION_MEAN), torch.tensor(vpretrained.TORCHVISION_STD)


@pytest.fixture(scope="module")
def torchvision_vgg16(tmp_path_factory):
    """torchvision's vgg16 with random weights, saved as the bare state dict torchvision publishes."""
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()
    path = tmp_path_factory.mktemp("tv") / "vgg16-397923af.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture
def torch_home(tmp_path, monkeypatch, torchvision_vgg16):
    """A TORCH_HOME whose hub cache holds the file, where torchvision's weights API looks first."""
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "vgg16-397923af.pth").symlink_to(torchvision_vgg16[1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def assert_same_logits(net, model):
    pixels = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        ours = net.model(normalize(pixels, net.mean_rgb))
        theirs = model((pixels.float() / 255 - MEAN[:, None, None]) / STD[:, None, None])
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
    assert not torch.allclose(ours, torch.zeros_like(ours))  # a real comparison, not two zero outputs


def test_a_bare_torchvision_state_dict_evaluates_to_torchvisions_logits(torchvision_vgg16):
    model, path = torchvision_vgg16
    net = load_eval_net(path)
    assert net.model.arch_name == "D" and net.scales == [256, 384, 512]
    assert net.mean_rgb == pytest.approx([255 * m for m in vpretrained.TORCHVISION_MEAN])
    assert_same_logits(net, model)


def test_weights_from_torchvisions_cache_evaluate_to_the_same_logits(torchvision_vgg16, torch_home):
    assert vpretrained.cache_file("vgg16") == torch_home / "hub" / "checkpoints" / "vgg16-397923af.pth"
    net = load_eval_net("torchvision:vgg16")
    assert "torchvision:vgg16" in net.name
    assert_same_logits(net, torchvision_vgg16[0])


def test_no_network_and_no_cache_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match=str(tmp_path / "empty" / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth")):
        load_eval_net("torchvision:vgg19")
    with pytest.raises(UserError, match="allowed: torchvision:vgg11"):
        load_eval_net("torchvision:vgg12")


def test_init_from_a_torchvision_state_dict_fine_tunes_the_same_net(torchvision_vgg16):
    model, path = torchvision_vgg16
    ours = build_vgg("D", num_classes=1000)
    classes = [f"n{i:08d}" for i in range(1000)]
    copied = init_from_checkpoint(ours, load_net_checkpoint(path), str(path), classes)
    assert len(copied) == len(ours.state_dict())
    # every layer is torchvision's but the first conv, which takes 0-255 pixels minus the mean
    for name, tensor in model.state_dict().items():
        if name != "features.0.weight":
            assert torch.equal(ours.state_dict()[name], tensor), name
    net = load_eval_net(path)
    assert torch.equal(ours.state_dict()["features.0.weight"], net.model.state_dict()["features.0.weight"])


def test_evaluate_cli_with_torchvision_weights(torchvision_vgg16, torch_home, sample_root, tmp_path):
    """--weights through the real CLI, on a 1000-class val folder (two classes hold images)."""
    val = tmp_path / "data" / "val"
    for i in range(1000):
        (val / f"n{i:08d}").mkdir(parents=True)
    for i, source in enumerate(("n00000005", "n00000006")):
        for image in sorted((sample_root / "val" / source).glob("*.JPEG"))[:1]:
            shutil.copy(image, val / f"n{i:08d}" / image.name)
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--weights", "torchvision:vgg16",
                             "--data", str(tmp_path / "data"), "--scales", "224", "--workers", "0", "--device", "cpu",
                             "--out", str(tmp_path / "eval" / "tv")], capture_output=True, text=True, cwd=ROOT,
                            env=dict(subprocess_env(), TORCH_HOME=str(torch_home)), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "eval" / "tv.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["method"] == "dense" and "torchvision:vgg16" in rows[0]["net"]
