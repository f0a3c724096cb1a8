"""Issue 10, bad input: impossible values, run names and unwritable outputs are refused in one line before
any data scan or model build; running out of memory names the flag to lower. All through the real CLIs."""

import os
import re
import stat
import subprocess
import sys

import pytest
from conftest import ROOT, assert_one_line_error, subprocess_env
from test_train import tiny_config

from vgg.training.run import run as train_run

MISSING_DATA = "/does/not/exist/imagenet"  # would fail the data scan: a value error must come first


def cli(script, *args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout, cwd=cwd)


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "0", "lr must be in (0, 10]"),
    ("--lr", "-0.01", "lr must be in (0, 10]"),
    ("--lr", "nan", "lr must be in (0, 10], got nan"),
    ("--momentum", "-0.1", "momentum must be in [0, 1)"),
    ("--weight-decay", "-5e-4", "weight_decay must be in [0, 1]"),  # spelt --weight-decay=-5e-4 by argparse's rules
    ("--lr-factor", "1", "lr_factor must be in (0, 1)"),
    ("--lr-factor", "0", "lr_factor must be in (0, 1)"),
    ("--log-every", "0", "log_every must be in [1, "),
    ("--workers", "-1", "workers must be in [0, 1024]"),
    ("--steps-per-epoch", "-1", "steps_per_epoch must be in [0, "),
    ("--patience", "-1", "patience must be in [0, 1000]"),
    ("--dropout", "1.5", "dropout must be in [0, 1)"),
    ("--width", "0", "width must be in (0, 16]"),
    ("--color-shift-std", "inf", "color_shift_std must be in [0, 10], got inf"),
    ("--checkpoint-every", "-5", "checkpoint_every must be in [0, "),
])
def test_impossible_values_are_refused_before_any_data_scan(flag, value, message, tmp_path):
    result = cli("train.py", f"{flag}={value}", "--data", MISSING_DATA, "--out-dir", str(tmp_path / "out"))
    assert_one_line_error(result, message, flag)
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("name", ["../../escaped", "", "..", "a/b"])
def test_run_names_that_leave_the_out_dir_are_refused(name, tmp_path):
    out = tmp_path / "nest" / "out"
    result = cli("train.py", "--run-name", name, "--data", MISSING_DATA, "--out-dir", str(out),
                 "--log-dir", str(tmp_path / "nest" / "runs"))
    assert_one_line_error(result, "run_name", "plain folder name")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "nest").exists()


def test_unwritable_output_places_are_refused_up_front(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    # A file where the run folder's parent should be: refused before the (missing) data is looked at.
    common = ["--config", "demo", "--data", MISSING_DATA]
    assert_one_line_error(cli("train.py", *common, "--out-dir", str(a_file)), "--out-dir", "cannot be written")
    assert_one_line_error(cli("train.py", *common, "--log-dir", str(a_file / "runs"), "--out-dir", str(tmp_path / "ok")),
                          "--log-dir", "cannot be written")
    # A read-only file system (sysfs refuses new entries even to root, for whom chmod 555 is no barrier).
    assert_one_line_error(cli("train.py", *common, "--out-dir", "/sys/vgg-imagenet-test"),
                          "--out-dir /sys/vgg-imagenet-test", "cannot be written")


def test_data_without_config_is_refused_with_a_hint(tmp_path):
    # Forgetting --config would train the tiny demo net on a real dataset without a word.
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    result = cli("train.py", "--data", str(tmp_path / "imagenet"), "--out-dir", str(tmp_path / "out"))
    assert_one_line_error(result, "without --config", "--config A")
    assert not (tmp_path / "out").exists()


def test_help_shows_the_defaults_of_the_config_in_use():
    demo, d = cli("train.py", "--help"), cli("train.py", "--config", "D", "--help")
    assert demo.returncode == d.returncode == 0
    flat = [" ".join(text.split()) for text in (demo.stdout, d.stdout)]
    arch_help = r"--arch ARCH net: VGG configuration \(A, A-LRN, B, C, D, E\) or a neighbour [^()]*\([a-z0-9_, ]+\) "
    assert re.search(arch_help + r"\(default: 'A'\)", flat[0]), flat[0]
    assert "(default: 0.125)" in flat[0] and "(default: 1.0)" in flat[1]  # the demo's width vs D's
    assert re.search(arch_help + r"\(default: 'D'\)", flat[1]), flat[1]


@pytest.fixture(scope="module")
def checkpoint(sample_root, tmp_path_factory):
    """best.pt of one tiny epoch (the demo's net on the sample data)."""
    out = tmp_path_factory.mktemp("hardening")
    train_run(tiny_config(sample_root, out, epochs=1, steps_per_epoch=2))
    return out / "checkpoints" / "tiny" / "best.pt"


def test_evaluate_refuses_an_unwritable_out_before_evaluating(checkpoint, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    result = cli("evaluate.py", "--checkpoint", str(checkpoint), "--out", str(a_file / "results"),
                 "--workers", "0", "--device", "cpu")
    assert_one_line_error(result, "--out", "cannot be written")
    assert result.stdout == ""  # no table: nothing was evaluated


def test_evaluate_out_of_memory_names_the_flags_to_lower(checkpoint):
    # Q = 100000 rescales each image to about 100000 x 133000 x 3 bytes (~40 GB): the allocation fails
    # in the loader worker and must come back as one line, not a worker traceback.
    result = cli("evaluate.py", "--checkpoint", str(checkpoint), "--scales", "100000", "--workers", "1",
                 "--device", "cpu")
    assert_one_line_error(result, "out of memory (tried to allocate", "--batch-size", "--scales")


def test_train_out_of_memory_names_the_flags_to_lower(sample_root, tmp_path):
    # FC layers of 10^8 units need ~24 GiB for the first weight matrix alone.
    result = cli("train.py", "--config", "demo", "--data", str(sample_root), "--fc-width", "100000000",
                 "--workers", "0", "--stats-images", "50", "--device", "cpu", "--out-dir", str(tmp_path / "c"),
                 "--log-dir", str(tmp_path / "r"))
    assert_one_line_error(result, "out of memory (tried to allocate", "--batch-size", "--fc-width")


def test_checkpoints_are_written_with_the_users_umask(checkpoint):
    # mkstemp makes its temp file 0600; a checkpoint others in the group may read is the usual file mode.
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o666 & ~umask
