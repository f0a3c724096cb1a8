import gc
import multiprocessing
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def no_child_process_left_running():
    """A test ends every process it started. A DataLoader worker left behind (its loader kept alive by a
    reference cycle, say) ignores SIGTERM, so torch cannot end it, and a later test that ends this
    process's children, or the SIGCHLD handler torch installs, would fail for it there, far from its cause."""
    yield
    left = multiprocessing.active_children()
    if left:
        gc.collect()  # a loader in a cycle shuts its workers down when collected, if it can
        left = multiprocessing.active_children()
    for child in left:
        child.kill()
        child.join(10)
    assert not left, f"the test left {len(left)} child process(es) running: {left}"


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """The generated sample dataset (real JPEGs, awkward files included), made once per test session."""
    from vgg.data.datasets.sample import make_sample_dataset

    return make_sample_dataset(tmp_path_factory.mktemp("data") / "sample")


def subprocess_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


def error_line(result) -> str:
    """The last line a CLI wrote to stderr (progress-bar redraws split into lines of their own)."""
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_one_line_error(result, *fragments):
    """Exit 2, no traceback, one `error:` line of its own and last (a progress bar may precede it),
    holding every fragment."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert [line for line in lines if "error" in line] == [lines[-1]] and lines[-1].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


def evaluate_catching_probs(nets, val_dir, monkeypatch, **kwargs):
    """evaluate_dataset (dense and multi-crop) and the soft-max of every row, caught on their way to the table."""
    from vgg.evaluation import methods as vmethods
    from vgg.evaluation import runner as vrunner

    caught = []
    real_rows = vrunner._result_rows

    def catching_rows(*args, **kw):
        rows = real_rows(*args, **kw)
        caught.extend(row["probs"].clone() for row in rows)
        return rows

    monkeypatch.setattr(vrunner, "_result_rows", catching_rows)
    result = vrunner.evaluate_dataset(nets, val_dir, methods=(vmethods.DENSE, vmethods.MULTI_CROP),
                                         progress=False, **kwargs)
    return result, caught


def wait_for_each_checkpoint(monkeypatch):
    """Make every checkpoint save of a run wait for its background write (vgg.core.checkpoint.CheckpointWriter),
    for tests that read last.pt / best.pt while the run is still going."""
    from vgg.core.checkpoint import CheckpointWriter

    real_save = CheckpointWriter.save

    def save_and_wait(writer, path, **state):
        real_save(writer, path, **state)
        writer.wait()
    monkeypatch.setattr(CheckpointWriter, "save", save_and_wait)


def wait_for_the_next_second():
    """TensorBoard reads a run's event files in name order: whole seconds, host, pid, then a per-process
    counter, so two writers opened in one second by one process sort wrongly once the counter crosses a
    digit boundary (9 -> 10). Real resumes are separate processes seconds apart; a test that runs a
    resume in-process right after the first run waits for the next second first."""
    import time

    time.sleep(1.0 - time.time() % 1.0 + 0.01)


def snapshot(*folders) -> dict:
    """Every file under `folders`, path -> bytes: to check that a command changed nothing there."""
    return {p: p.read_bytes() for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}
