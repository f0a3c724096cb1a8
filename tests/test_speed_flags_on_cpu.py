"""The CUDA speed settings, run where CI can: fused SGD, DDP's bucket views, and bf16 autocast,
channels-last and torch.compile asked for on the CPU (alone and under 2-process gloo DDP), then the
checkpoint they write resumed and evaluated."""

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, subprocess_env
from test_recipe import small_net
from test_train import common_cli_args, tiny_config

from vgg.config import Config
from vgg.models.vgg import build_vgg
from vgg.training import build as vbuild
from vgg.training import recipe as vrecipe
from vgg.training import run as vrun
from vgg.training.step import train_step


def test_fused_sgd_steps_equal_the_plain_per_tensor_loop():
    model = small_net()
    initial, plain_model = copy.deepcopy(model.state_dict()), copy.deepcopy(model)
    config = Config(bias_decay=False)  # two groups: with and without weight decay
    optimizer = vrecipe.build_optimizer(model, config)
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


@pytest.mark.parametrize("bf16, dtype", [(True, torch.bfloat16), ("auto", torch.float32), (False, torch.float32)])
def test_a_training_step_runs_in_bf16_on_the_cpu_only_when_asked(bf16, dtype):
    model = small_net()
    optimizer = vrecipe.build_optimizer(model, Config())
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits, loss = train_step(model, images, labels, optimizer, bf16=bf16)
    assert logits.dtype == dtype and loss.dtype == torch.float32  # the loss is fp32 either way


def run_cli(script: str, *args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          env={**subprocess_env(), **env}, cwd=ROOT, timeout=600)


def tiny_dataset(sample_root, root):
    """3 classes of the sample dataset's readable JPEGs, 8 train and 8 val images each: every batch below
    is full, so the compiled net sees one input shape for training and one for validation."""
    for split in ("train", "val"):
        for class_dir in sorted(p for p in (sample_root / split).iterdir() if p.is_dir())[:3]:
            (root / split / class_dir.name).mkdir(parents=True)
            for path in sorted(p for p in class_dir.iterdir() if "awkward" not in p.name)[:8]:
                shutil.copy(path, root / split / class_dir.name / path.name)
    return root


def test_bf16_channels_last_and_compile_on_cpu_single_and_ddp_then_resume_and_evaluate(sample_root, tmp_path):
    """All three asked for on the CPU: one process trains epoch 0, two gloo processes resume it for epoch 1,
    and evaluate.py reads the result. The checkpoints hold the bare net's weights."""
    data = tiny_dataset(sample_root, tmp_path / "data")
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # the later runs reuse the first one's kernels
    speed = ["--bf16", "true", "--channels-last", "true", "--compile", "true"]
    args = [*common_cli_args(data, tmp_path), "--workers", "0", "--stats", "imagenet", "--batch-size", "8",
            "--steps-per-epoch", "2", "--run-name", "speed", *speed]
    first = run_cli("train.py", *args, "--epochs", "1", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "speed settings on cpu: bf16 autocast on, channels-last on, torch.compile on" in first.stderr
    assert any((tmp_path / "inductor").rglob("*.py"))  # inductor really compiled the net
    last = tmp_path / "checkpoints" / "speed" / "last.pt"
    raw = torch.load(last, weights_only=True)
    names = list(build_vgg("A", num_classes=3, width=0.125, fc_width=256, image_size=32).state_dict())
    assert list(raw["model"]) == names  # no "_orig_mod." prefix from torch.compile
    assert raw["model"]["features.0.weight"].is_contiguous(memory_format=torch.channels_last)
    assert raw["epoch"] == 1

    second = run_cli("train.py", *args, "--epochs", "2", "--gpus", "2", "--resume", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "2 x cpu" in second.stderr and "channels-last on, torch.compile on" in second.stderr
    raw = torch.load(last, weights_only=True)
    assert (raw["epoch"], raw["world_size"]) == (2, 2)
    assert list(raw["model"]) == names  # nor "module." from DDP
    assert all(g["fused"] for g in raw["optimizer"]["param_groups"])

    result = run_cli("evaluate.py", "--checkpoint", str(last), "--dense", "--single-scale", "--data", str(data),
                     "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "eval"), "--bf16", "true",
                     "--channels-last", "true", env={})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["images"] == 24 and report["skipped"] == 0


@pytest.mark.parametrize("bf16", [True, False])
def test_a_run_trains_and_validates_in_bf16_on_the_cpu_only_when_asked(sample_root, tmp_path, monkeypatch, bf16):
    """--bf16 true reaches every forward pass of a run, training and validation; false none."""
    autocast_seen = {True: set(), False: set()}  # net.training -> autocast states seen
    build_net = vbuild.build_net

    def recording_build_net(*args, **kwargs):
        net = build_net(*args, **kwargs)
        net.register_forward_pre_hook(
            lambda module, inputs: autocast_seen[module.training].add(torch.is_autocast_enabled("cpu")))
        return net

    monkeypatch.setattr(vbuild, "build_net", recording_build_net)
    vrun.run(tiny_config(sample_root, tmp_path, run_name="bf16", bf16=bf16, epochs=1, steps_per_epoch=2,
                             workers=0, stats="imagenet"))
    assert autocast_seen == {True: {bf16}, False: {bf16}}
