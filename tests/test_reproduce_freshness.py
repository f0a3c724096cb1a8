"""reproduce.py never reports stale numbers (issue 37): an evaluation whose results are older than any of its
nets' checkpoints is done again (every net of a fusion), in the same invocation as the training that wrote
the checkpoint; the report's curves are those of each epoch's last metrics.jsonl row, drawn again when the
file changes. Real files, and real demo-scale runs through reproduce's own functions (one process)."""

import json
import os

import matplotlib.figure
import pytest
import torch

from vgg.core.checkpoint import load_checkpoint, save_checkpoint
from vgg.reproduce import plan as vplan
from vgg.reproduce.plan import EVAL_STAGES, MARKER, Settings, eval_status
from vgg.reproduce.report import write_report
from vgg.reproduce.stages import reproduce


def settings_in(sample_root, tmp_path) -> Settings:
    return Settings(scale="demo", data=str(sample_root), out_dir=tmp_path / "out", log_dir=tmp_path / "logs",
                    runtime={**vplan.DEMO_RUNTIME, "device": "cpu", "workers": 0})


def touch(path, mtime: float, content: bytes = b"") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(content)
    os.utime(path, (mtime, mtime))


def test_an_evaluation_is_stale_when_any_of_its_nets_is_newer(tmp_path):
    """table5-6 fuses D-jitter and E-jitter: a newer best.pt of either one makes its results stale."""
    settings = settings_in("unused", tmp_path)
    fusion = next(s for s in EVAL_STAGES if s.name == "table5-6")
    assert fusion.nets == ("D-jitter", "E-jitter")
    results = settings.eval_out(fusion.name).with_suffix(".json")
    touch(results, 2000, b"{}")
    for d_time, e_time, status in [(1000, 1000, "done"), (3000, 1000, "run"), (1000, 3000, "run"),
                                   (3000, 3000, "run"), (2000, 2000, "done")]:
        touch(settings.best("D-jitter"), d_time)
        touch(settings.best("E-jitter"), e_time)
        assert eval_status(fusion, settings) == status, (d_time, e_time)
    single = next(s for s in EVAL_STAGES if s.name == "table3-D-jitter")
    touch(settings.eval_out(single.name).with_suffix(".json"), 2500, b"{}")
    touch(settings.best("D-jitter"), 3000)
    assert eval_status(single, settings) == "run"
    touch(settings.best("D-jitter"), 1000)
    assert eval_status(single, settings) == "done"


def plotted_curves(monkeypatch) -> list:
    """The y values of every line of every figure write_report saves, figure by figure."""
    figures = []
    real_savefig = matplotlib.figure.Figure.savefig

    def capturing_savefig(fig, *args, **kwargs):
        figures.append([[float(y) for y in line.get_ydata()] for ax in fig.axes for line in ax.lines])
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capturing_savefig)
    return figures


def metrics_row(epoch: int, err: float) -> str:
    return json.dumps({"epoch": epoch, "val_top1_err": err, "val_top5_err": err / 2, "train_loss": err / 10})


def test_the_curves_use_each_epochs_last_row_and_follow_a_rewritten_file(tmp_path, monkeypatch):
    """A resumed run rewrites an epoch's row (issue 29 keeps one; older runs appended a second): the curve
    shows the last one, and a curve drawn before the file changed is drawn again."""
    settings = settings_in("unused", tmp_path)
    metrics = settings.run_dir("A") / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.write_text("\n".join([metrics_row(0, 80.0), metrics_row(1, 70.0), metrics_row(1, 60.0)]) + "\n")
    os.utime(metrics, (1000, 1000))
    figures = plotted_curves(monkeypatch)
    write_report(settings)
    assert figures == [[[80.0, 60.0], [40.0, 30.0], [8.0, 6.0]]]  # val top-1, val top-5, train loss
    report = json.loads((settings.out_dir / "report.json").read_text())
    assert report["curves"] == {"A": "curves/A.png"}

    metrics.write_text("\n".join([metrics_row(0, 80.0), metrics_row(1, 50.0)]) + "\n")  # a resumed epoch 1
    png = settings.out_dir / "curves" / "A.png"
    os.utime(png, (2000, 2000))
    os.utime(metrics, (3000, 3000))
    write_report(settings)
    assert figures[1] == [[80.0, 50.0], [40.0, 25.0], [8.0, 5.0]]


@pytest.fixture
def small_demo(monkeypatch):
    """The demo's plan cut to 2 epochs of 2 steps; the test process's torch threads as they were after."""
    for name, value in dict(epochs=2, steps_per_epoch=2, batch_size=16, stats_images=20).items():
        monkeypatch.setitem(vplan.DEMO_OVERRIDES, name, value)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_stage_trained_in_this_invocation_is_evaluated_again_in_it(sample_root, tmp_path, small_demo, capsys):
    """Net A resumed (as if stopped before its last epoch, which then improves on the best: best.pt is
    rewritten) while table3-A's results were newer than the best.pt they tested when the plan was made:
    the evaluation runs again after the training, in the same invocation."""
    settings = settings_in(sample_root, tmp_path)
    reproduce(settings, ["A", "table3-A"], dry_run=False)
    results = settings.eval_out("table3-A").with_suffix(".json")
    best = settings.best("A")
    assert results.stat().st_mtime >= best.stat().st_mtime
    capsys.readouterr()

    run_dir = settings.run_dir("A")
    ckpt = load_checkpoint(run_dir / "last.pt")
    save_checkpoint(run_dir / "last.pt", **{**ckpt, "epoch": ckpt["epoch"] - 1, "best_top1": -1.0, "best": None})
    (run_dir / MARKER).unlink()
    os.utime(best, (1000, 1000))  # the plan sees results newer than best.pt: table3-A complete
    reproduce(settings, ["A", "table3-A"], dry_run=False)
    out = capsys.readouterr().out
    assert "] A: interrupted, resuming" in out and "] A: done in" in out
    assert best.stat().st_mtime > 1000  # the resumed epoch wrote best.pt
    assert "] table3-A: done in" in out, out
    assert results.stat().st_mtime >= best.stat().st_mtime
