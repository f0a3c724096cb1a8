"""Hardening round 4 (issue 34), the command lines: every numeric option of every command has a range,
refused in one line (13); --workers is bounded by the cores (12); a cut-short torchvision weights file in
the cache is one line (11)."""

import argparse
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_one_line_error, subprocess_env

import evaluate
import reproduce
import train
import transfer
from vgg.config import check_ranges
from vgg.core.errors import UserError
from vgg.data import __main__ as data_cli

HUGE = "99999999999999999999999"  # the seed of the report: it overflowed torch.manual_seed


def numeric_options(parser: argparse.ArgumentParser, prefix: list[str]):
    """(argv before the option, the option) for every option of `parser` (and of its subcommands) that
    takes a number."""
    for action in parser._actions:  # argparse keeps no public list of its options
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from numeric_options(sub, [*prefix, name])
        elif action.option_strings and action.type in (int, float):
            yield prefix, action.option_strings[0]


# What each command needs besides the option to reach its checks (a positional, --scale demo).
COMMANDS = {
    "train.py": (train.main, argparse.ArgumentParser(parents=[train.get_args_parser()]), []),
    "evaluate.py": (evaluate.main, evaluate.get_parser(), []),
    "reproduce.py": (reproduce.main, reproduce.get_parser(), ["--scale", "demo"]),
    "python -m vgg.data": (data_cli.main, data_cli.build_parser(), []),
    "transfer.py": (transfer.main, transfer.get_parser(), ["--data", "/nowhere", "--checkpoint", "/nowhere.pt"]),
}
POSITIONALS = {"shards": ["/nowhere/src", "/nowhere/dest"], "stats": ["--train-dir", "/nowhere/train"]}
CASES = [(command, [*prefix, *POSITIONALS.get(prefix[0] if prefix else "", []), *extra], option)
         for command, (_, parser, extra) in COMMANDS.items()
         for prefix, option in numeric_options(parser, [])]


def test_the_cases_cover_every_command():
    assert len(CASES) >= 35
    for command in COMMANDS:
        assert any(case[0] == command for case in CASES), command
    assert ("python -m vgg.data", ["sample"], "--seed") in CASES


@pytest.mark.parametrize("command, argv, option", CASES, ids=[f"{c}-{' '.join(a[:1])}-{o}" for c, a, o in CASES])
@pytest.mark.parametrize("value", [HUGE, "-" + HUGE])
def test_every_numeric_option_has_a_range(command, argv, option, value, capsys):
    """Parse and check only (in-process): each is refused in one line naming the option, before any work."""
    main = COMMANDS[command][0]
    assert main([*argv, f"{option}={value}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in "\n".join(lines), lines
    assert option in lines[-1] and "must be" in lines[-1], lines[-1]


def test_an_out_of_range_seed_is_one_line_through_the_real_command():
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--seed", HUGE], capture_output=True, text=True,
                            env=subprocess_env(), timeout=300, cwd=ROOT)
    assert_one_line_error(result, "seed must be in [0, 4294967295], got 9999999999999999999", "(--seed)")


# --- 12. --workers bounded by the cores ---------------------------------------------------------------

def test_workers_beyond_the_cores_are_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """`--workers 1000` under a job's memory limit was OOM-killed without a word: now refused up front,
    naming the cores; 8 a process (the default's cap) always passes, and --gpus N shares the cores."""
    assert train.main(["--workers", "1000", "--out-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --workers 1000 is too many for ")
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr("vgg.config.fields.usable_cpus", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    check_ranges({"workers": 64, "gpus": 1})
    check_ranges({"workers": 8, "gpus": 8})  # 8 a process always
    with pytest.raises(UserError, match=r"--workers 16 is too many for 16 usable core\(s\) and 8 process\(es\): "
                                        "at most 8"):
        check_ranges({"workers": 16, "gpus": 8})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's processes on this machine
    with pytest.raises(UserError, match="at most 16 a process"):
        check_ranges({"workers": 17, "gpus": 1})


# --- 11. A cut-short torchvision weights file in the cache -------------------------------------------

def test_a_cut_short_torchvision_weights_file_is_one_line(tmp_path, monkeypatch):
    """The offline error tells the user to put the file at the cache path; a copy cut short there gave a
    PytorchStreamReader traceback."""
    from vgg.models.pretrained import cache_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # torch.hub's cache: $TORCH_HOME/hub/checkpoints/
    path = cache_file("vgg11")
    path.parent.mkdir(parents=True)
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 10])  # (a tenth: PytorchStreamReader's traceback)
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--weights", "torchvision:vgg11",
                             "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "eval" / "x")],
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**subprocess_env(), "TORCH_HOME": str(tmp_path / "torch")})
    assert_one_line_error(result, f"torchvision:vgg11: {path} is cut short or damaged (PytorchStreamReader",
                          "delete it")
