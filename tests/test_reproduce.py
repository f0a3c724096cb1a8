"""reproduce.py: the paper's whole DAG through the real CLI at --scale demo (twelve real runs on the sample
dataset, every evaluation), the report, skipping, resuming, --dry-run, bad input; and the plan's data
against the configs."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, snapshot, subprocess_env
from test_hardening_cli import assert_one_line_error

from vgg.config import Config, config_path, load_yaml
from vgg.core.checkpoint import load_checkpoint, save_checkpoint
from vgg.reproduce.plan import (
    DEMO_CROP,
    DEMO_OVERRIDES,
    EVAL_STAGES,
    MARKER,
    PAPER_ROWS,
    TABLE_TITLES,
    TRAIN_STAGES,
    demo_px,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STAGE_NAMES = [s.name for s in [*TRAIN_STAGES, *EVAL_STAGES]]


def reproduce_cli(*args, timeout=1200):
    return subprocess.run([sys.executable, str(ROOT / "reproduce.py"), *args], capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout, cwd=ROOT)


def demo_args(sample_root, work):
    return ["--scale", "demo", "--data", str(sample_root), "--out-dir", str(work / "out"),
            "--log-dir", str(work / "logs"), "--device", "cpu"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, sample_root):
    """The whole DAG at --scale demo, run once: (working folder, CLI arguments, the run's output)."""
    work = tmp_path_factory.mktemp("reproduce")
    args = demo_args(sample_root, work)
    proc = reproduce_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, args, proc


# --- The plan's data agrees with the configs and the paper's protocol --------------------------------


def config_values(name: str) -> Config:
    return Config(**load_yaml(config_path(name)))


def test_every_training_stage_starts_from_what_its_config_names():
    from vgg.models.zoo import VGG_ARCHS  # the plan is the paper's: every VGG config, not the other nets' (issue 14)
    vgg_configs = {p.stem for p in config_path("A").parent.glob("*.yaml") if p.stem.split("-")[0] in VGG_ARCHS}
    assert {s.name for s in TRAIN_STAGES} == vgg_configs
    order = [s.name for s in TRAIN_STAGES]
    for stage in TRAIN_STAGES:
        init_from = config_values(stage.config).init_from
        assert init_from == (f"checkpoints/{stage.after}/best.pt" if stage.after else ""), stage.name
        if stage.after:
            assert order.index(stage.after) < order.index(stage.name)  # its input is trained first


def test_test_scales_follow_the_paper():
    """Table 3: Q = S or the jitter middle; Tables 4-6: {S-32, S, S+32} or {S_min, middle, S_max} (§4.1, §4.2)."""
    for stage in EVAL_STAGES:
        for net in stage.nets:
            c = config_values(net)
            if stage.name.startswith("table3-"):
                assert stage.scales == (c.test_scale,), stage.name
            elif c.jittered:
                assert stage.scales == (c.scale_min, c.test_scale, c.scale_max), stage.name
            else:
                assert stage.scales == (c.scale_min - 32, c.scale_min, c.scale_min + 32), stage.name
    sources = {s.name: s for s in EVAL_STAGES}
    for row in PAPER_ROWS:
        source = sources[row.source]
        assert set(row.nets) <= set(source.nets) and row.test_q == ",".join(map(str, source.scales)), row
    assert sorted({r.table for r in PAPER_ROWS}) == sorted(TABLE_TITLES) == [3, 4, 5, 6]


def test_demo_sizes_keep_the_paper_ratio_to_the_crop_and_every_method_is_defined():
    assert demo_px(224) == DEMO_CROP and DEMO_OVERRIDES["crop_size"] == DEMO_CROP
    for q in {q for s in EVAL_STAGES for q in s.scales}:
        assert demo_px(q) >= DEMO_CROP  # a crop (multi-crop) and the first FC layer's window (dense) fit
        assert abs(demo_px(q) / DEMO_CROP - q / 224) <= 0.5 / DEMO_CROP
    assert [demo_px(q) for q in (256, 384, 512)] == [37, 55, 73]


# --- The whole DAG through the CLI ---------------------------------------------------------------------


def test_dry_run_prints_every_command_and_runs_nothing(sample_root, tmp_path):
    proc = reproduce_cli(*demo_args(sample_root, tmp_path), "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 * len(STAGE_NAMES)
    for i, name in enumerate(STAGE_NAMES):
        assert lines[2 * i].endswith(f"] {name}: to run"), lines[2 * i]
        script = "train.py" if i < len(TRAIN_STAGES) else "evaluate.py"
        assert lines[2 * i + 1].split()[:2] == ["python", script], lines[2 * i + 1]
    assert "--config D-S384" in proc.stdout and f"--init-from {tmp_path / 'out' / 'D' / 'best.pt'}" in proc.stdout
    assert "--scales 37 55 73" in proc.stdout and "--multi-crop" in proc.stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / "logs").exists()


def test_demo_report_fills_every_row_of_tables_3_to_6(demo):
    work, _, proc = demo
    out = work / "out"
    for name in STAGE_NAMES:
        assert f"] {name}: to run" in proc.stdout and f"] {name}: done in" in proc.stdout, name
    report = json.loads((out / "report.json").read_text())
    assert report["scale"] == "demo" and len(report["rows"]) == len(PAPER_ROWS)
    for row, paper in zip(report["rows"], PAPER_ROWS):
        assert (row["table"], row["net"], row["method"]) == (paper.table, paper.net, paper.method)
        for k in ("1", "5"):
            ours = row[f"top{k}_err"]
            assert isinstance(ours, float) and 0 <= ours <= 100, row
            assert row[f"diff_top{k}"] == pytest.approx(ours - row[f"paper_top{k}_err"])
        expected_q = ",".join(str(demo_px(int(q))) for q in paper.test_q.split(","))
        assert row["our_test_q"] == expected_q, row
    # Fusion really averages two nets: its row differs from at least one of the single nets'.
    rows = {(r["table"], r["net"], r["method"]): r for r in report["rows"]}
    fused = rows[6, "D-jitter + E-jitter", "dense"]["top1_err"]
    assert fused != rows[5, "D-jitter", "dense"]["top1_err"] or fused != rows[5, "E-jitter", "dense"]["top1_err"]

    md = (out / "report.md").read_text()
    assert "not run" not in md
    for title in TABLE_TITLES.values():
        assert f"## {title}" in md
    table_lines = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| net")]
    assert len(table_lines) == len(PAPER_ROWS) + len(STAGE_NAMES) + 1  # + the stages table and its header
    for stage in TRAIN_STAGES:  # a curve per run, linked, a real PNG; the run's TensorBoard events
        png = out / "curves" / f"{stage.name}.png"
        assert f"]({'curves/' + stage.name + '.png'})" in md
        assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 1000
        metrics = (out / stage.name / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == DEMO_OVERRIDES["epochs"]
        assert list((work / "logs" / stage.name).glob("events.out.tfevents.*"))
        assert json.loads((out / stage.name / MARKER).read_text())["scale"] == "demo"
    # The warm starts of §3.1 came from this DAG's own runs.
    assert load_checkpoint(out / "D-S384" / "best.pt")["config"]["init_from"] == str(out / "D" / "best.pt")
    assert load_checkpoint(out / "D-jitter" / "best.pt")["config"]["scale_max"] == demo_px(512)


def test_second_invocation_skips_every_stage(demo):
    work, args, _ = demo
    proc = reproduce_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in STAGE_NAMES:
        assert f"] {name}: complete, skipped" in proc.stdout, name
    assert "done in" not in proc.stdout and "to run" not in proc.stdout
    assert "report:" in proc.stdout


def test_interrupted_stage_is_resumed(demo):
    """E-jitter as if stopped after its next-to-last epoch: last.pt one epoch back, no marker. B as if killed
    after its run ended, before its marker: resumed, it says it is finished and changes nothing."""
    work, args, _ = demo
    run_dir = work / "out" / "E-jitter"
    ckpt = load_checkpoint(run_dir / "last.pt")
    ckpt["epoch"] -= 1
    save_checkpoint(run_dir / "last.pt", **ckpt)
    metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(metrics[:-1]) + "\n")
    (run_dir / MARKER).unlink()
    b_dir = work / "out" / "B"  # B as if killed between its run's end and its done-marker (issue 34)
    (b_dir / MARKER).unlink()
    b_files = snapshot(b_dir, work / "logs" / "B")

    proc = reproduce_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "] E-jitter: interrupted, resuming" in proc.stdout and "--config E-jitter" in proc.stdout
    assert "] E-jitter: done in" in proc.stdout
    assert "] B: interrupted, resuming" in proc.stdout and f"{b_dir / 'last.pt'} is a finished run" in proc.stderr
    assert (b_dir / MARKER).is_file()
    assert {path: data for path, data in snapshot(b_dir, work / "logs" / "B").items() if path.name != MARKER} == b_files
    for stage in TRAIN_STAGES:
        if stage.name not in ("E-jitter", "B"):
            assert f"] {stage.name}: complete, skipped" in proc.stdout, stage.name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(DEMO_OVERRIDES["epochs"]))  # the last epoch trained again
    assert (run_dir / MARKER).is_file()


def test_several_processes_run_each_stage_as_its_command(demo):
    """--gpus 2 (two CPU processes here): train.py and evaluate.py run as subprocesses under torchrun."""
    work, args, _ = demo
    out = work / "out"
    for path in (out / "A-LRN" / MARKER, out / "A-LRN" / "last.pt", out / "A-LRN" / "best.pt",
                 out / "A-LRN" / "metrics.jsonl", out / "eval" / "table3-A-LRN.json"):
        path.unlink()
    proc = reproduce_cli(*args, "--stages", "A-LRN", "table3-A-LRN", "--gpus", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "] A-LRN: to run" in proc.stdout and "] table3-A-LRN: to run" in proc.stdout
    assert proc.stdout.count("--gpus 2") == 2
    assert (out / "A-LRN" / MARKER).is_file()
    assert load_checkpoint(out / "A-LRN" / "best.pt")["config"]["gpus"] == 2
    result = json.loads((out / "eval" / "table3-A-LRN.json").read_text())
    assert result["world_size"] == 2
    report = json.loads((out / "report.json").read_text())
    assert all(r["top1_err"] is not None for r in report["rows"])


# --- Bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("demo_scale, extra, fragments", [
    (True, ["--stages", "F"], ["--stages 'F' matches no stage", "table5-6"]),
    (True, ["--stages", "D-S384"], ["stage D-S384 needs", "add D to --stages"]),
    (False, [], ["--scale paper trains on ImageNet: pass --data ROOT"]),
])
def test_bad_input_gives_one_line_and_exit_2(sample_root, tmp_path, demo_scale, extra, fragments):
    args = demo_args(sample_root, tmp_path) if demo_scale else ["--out-dir", str(tmp_path / "out")]
    assert_one_line_error(reproduce_cli(*args, *extra), *fragments)
    assert not (tmp_path / "out").exists()


def test_an_out_dir_of_the_other_scale_is_refused(demo, sample_root):
    work, _, _ = demo
    proc = reproduce_cli("--scale", "paper", "--data", str(sample_root), "--out-dir", str(work / "out"), "--dry-run")
    assert_one_line_error(proc, "marks a --scale demo run", "use another --out-dir")


def test_the_curves_number_epochs_as_the_logs_do(tmp_path, monkeypatch):
    """metrics.jsonl and the log lines count epochs from 0: so do the plots' x axes (issue 30)."""
    import matplotlib.figure

    from vgg.reproduce.report import plot_curves

    plotted = []
    real_savefig = matplotlib.figure.Figure.savefig

    def capturing_savefig(fig, *args, **kwargs):
        plotted.extend([float(x) for x in line.get_xdata()] for ax in fig.axes for line in ax.lines)
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capturing_savefig)
    metrics = [{"epoch": e, "val_top1_err": 50.0 - e, "val_top5_err": 20.0 - e, "train_loss": 2.0 - e / 10}
               for e in range(3)]
    plot_curves("A", metrics, tmp_path / "A.png")
    assert plotted == [[0.0, 1.0, 2.0]] * 3  # val top-1, val top-5, train loss
    assert (tmp_path / "A.png").stat().st_size > 0
