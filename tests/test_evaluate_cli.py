"""evaluate.py end to end in a subprocess: a checkpoint from a short training run, the sample dataset."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env


def run(args, cwd, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_root):
    """A working folder holding checkpoints/short/best.pt from one short epoch of the demo config."""
    work = tmp_path_factory.mktemp("work")
    proc = run([str(ROOT / "train.py"), "--config", "demo", "--epochs", "1", "--run-name", "short",
                "--data", str(sample_root), "--out-dir", str(work / "checkpoints"), "--log-dir", str(work / "runs"),
                "--steps-per-epoch", "4", "--stats-images", "50", "--workers", "0", "--device", "cpu"],
               cwd=work, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "checkpoints" / "short" / "best.pt").is_file()
    return work


def rows_of(json_path):
    result = json.loads(json_path.read_text())
    return [(r["net"], r["test_q"], r["method"], round(r["top1_err"], 6), round(r["top5_err"], 6))
            for r in result["rows"]], result


def test_dense_and_multi_crop_end_to_end_with_the_default_checkpoint(trained, sample_root):
    proc = run([str(ROOT / "evaluate.py"), "--dense", "--multi-crop", "--workers", "0", "--progress-every-s", "0"],
               cwd=trained)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["net", "train", "S", "test"]
    table = lines[2:5]
    assert [line.split("  ")[0].strip() for line in table] == ["A (short)"] * 3
    assert "dense" in table[0] and "multi-crop" in table[1] and "multi-crop & dense" in table[2]
    assert "[36;48]" in table[0] and "36,42,48" in table[0]  # demo config: S in [36, 48] -> Q = 36, 42, 48
    assert "per-class top-1 accuracy" in proc.stdout and "unreadable images skipped" in proc.stdout
    assert "\nevaluate: " in proc.stderr and "\r" not in proc.stderr  # no terminal: plain progress lines

    eval_dir = trained / "checkpoints" / "short" / "eval"
    json_files = sorted(eval_dir.glob("*.json"))
    assert len(json_files) == 1 and json_files[0].with_suffix(".md").is_file()
    rows, result = rows_of(json_files[0])
    assert len(rows) == 3 and all(0 <= r[3] <= 100 and 0 <= r[4] <= r[3] for r in rows)
    assert result["images"] > 0 and len(result["classes"]) == len(result["rows"][0]["per_class_top1_acc"])
    num_files = sum(1 for p in (sample_root / "val").rglob("*") if p.is_file())
    assert result["images"] + result["skipped"] <= num_files


def test_two_processes_count_every_image_once(trained):
    """--gpus 2 on CPU (gloo): the same numbers as one process, no image counted twice."""
    ckpt = str(trained / "checkpoints" / "short" / "best.pt")
    common = [str(ROOT / "evaluate.py"), "--dense", "--single-scale", "--checkpoint", ckpt, "--workers", "0",
              "--device", "cpu", "--batch-size", "4"]
    one = run([*common, "--out", str(trained / "one")], cwd=trained)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run([*common, "--gpus", "2", "--out", str(trained / "two")], cwd=trained)
    assert two.returncode == 0, two.stderr[-3000:]
    rows_one, result_one = rows_of(trained / "one.json")
    rows_two, result_two = rows_of(trained / "two.json")
    assert result_two["world_size"] == 2 and result_one["world_size"] == 1
    assert result_two["images"] == result_one["images"] and result_two["skipped"] == result_one["skipped"]
    assert result_two["class_images"] == result_one["class_images"]
    assert rows_two == rows_one
    assert two.stdout.count("top-1 err") == 1  # only rank 0 reports


def test_bad_input_gives_one_line_and_exit_2(trained, tmp_path):
    proc = run([str(ROOT / "evaluate.py"), "--dense"], cwd=tmp_path)  # no checkpoints/ here
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: no checkpoint found") and "--checkpoint" in proc.stderr

    proc = run([str(ROOT / "evaluate.py"), "--checkpoint", str(tmp_path / "missing.pt")], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: checkpoint not found")

    ckpt = str(trained / "checkpoints" / "short" / "best.pt")
    proc = run([str(ROOT / "evaluate.py"), "--checkpoint", ckpt, "--data", str(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: validation folder")


def test_evaluation_benchmark_runs(trained, sample_root):
    """A smoke run of bench/evaluate.py (speed is measured there, never tested): the three evaluators
    in turn, their errors compared, the figures line with the load before and after."""
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", "ca798b9^{commit}"]).returncode != 0:
        pytest.skip("the baseline revision ca798b9 is not in this clone (a shallow one)")
    proc = run([str(ROOT / "bench" / "evaluate.py"), "--checkpoint", str(trained / "checkpoints" / "short" / "best.pt"),
                "--data", str(sample_root), "--rounds", "1", "--methods", "dense", "--workers", "1",
                "--device", "cpu"], cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = [line for line in proc.stdout.splitlines() if line.startswith("round 1 ")]
    assert sorted(line.split()[2] for line in rounds) == ["baseline", "new", "new-plain"]
    figures = proc.stdout.splitlines()[-1]
    assert "same top-1/top-5 errors: dense:" in figures and "within rounds" in figures
    assert "load average" in figures and " before, " in figures and figures.endswith(" after")
