"""Hardening round 4 (issue 34), the `--gpus N` launcher and its processes: SIGHUP is a stop signal, a
signal while the launcher reports does not end it half way (15), and the processes that wait while rank 0
scans the data outlast the process group's timeout (the wait at ImageNet scale). Real processes, real
signals; a fault injected through sitecustomize where a moment must be hit exactly."""

import os
import signal
import socket
import subprocess
import sys
import textwrap

from conftest import ROOT, assert_one_line_error, subprocess_env
from test_hardening_round3_signals import Train, assert_saved_at_the_stop_step, cli_args


def launch_env(tmp_path, hook: str = "") -> dict:
    """The launcher's temporary folder under tmp_path (to see what it leaves), and a sitecustomize hook."""
    env = subprocess_env()
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    if hook:
        (tmp_path / "hook").mkdir()
        (tmp_path / "hook" / "sitecustomize.py").write_text(textwrap.dedent(hook))
        env["PYTHONPATH"] = f"{tmp_path / 'hook'}{os.pathsep}{env['PYTHONPATH']}"
    return env


def test_sighup_to_the_gpus_launcher_stops_the_run_and_leaves_nothing(sample_root, tmp_path):
    """A closed terminal or a dropped ssh: the launcher died of SIGHUP (its ranks saved on its death, but its
    report folder stayed in /tmp and no later line of theirs was printed). Now it passes SIGHUP on like
    SIGTERM: the ranks stop at one step, rank 0 saves, the launcher exits 129 and removes its folder."""
    run = Train(tmp_path, cli_args(sample_root, tmp_path, "hup", "--gpus", "2", "--workers", "1", "--epochs", "1000",
                                   "--batch-size", "16", "--progress-every-s", "0"), env=launch_env(tmp_path))
    run.wait_for("epoch 0: 1/")
    run.proc.send_signal(signal.SIGHUP)
    code, output = run.finish()
    assert code == 128 + signal.SIGHUP, output[-3000:]
    assert "SIGHUP received" in output
    assert_saved_at_the_stop_step(tmp_path / "checkpoints" / "hup", output)
    assert not list((tmp_path / "tmp").glob("vgg-launch-*"))


def test_a_signal_while_the_launcher_reports_does_not_end_it(sample_root, tmp_path):
    """The launcher put back the default handlers once its processes had ended, before it printed their
    lines: a second SIGTERM then (one a moment after the first) killed it, the line unprinted and its
    report folder left. The signal is sent, for real, at the start of the report."""
    hook = """
        # Test fault injection: a SIGTERM reaches the launcher just as it starts to report.
        import os, signal
        from vgg.core import launch

        _report = launch._report_and_code

        def report_and_code(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            return _report(*args, **kwargs)

        launch._report_and_code = report_and_code
    """
    missing = tmp_path / "A" / "best.pt"
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", "D", "--gpus", "2", "--device", "cpu",
                             "--data", str(sample_root), "--init-from", str(missing), "--workers", "0",
                             "--out-dir", str(tmp_path / "checkpoints"), "--log-dir", str(tmp_path / "runs")],
                            cwd=ROOT, env=launch_env(tmp_path, hook), capture_output=True, text=True, timeout=240)
    assert_one_line_error(result, f"--init-from {missing} not found")
    assert not list((tmp_path / "tmp").glob("vgg-launch-*"))


def test_ranks_outwait_a_scan_longer_than_the_process_groups_timeout(sample_root, tmp_path):
    """With --gpus N the other ranks waited on a collective while rank 0 scanned the training set (minutes
    for ImageNet on a network file system) and died past the process group's timeout. Two real gloo
    processes, a 2 s timeout, rank 0's scan and statistics 4 s each: both ranks go on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**subprocess_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "slow_wait_worker.py"), str(sample_root),
                               str(out), "2", "4"], env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              cwd=ROOT, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    errors = [proc.communicate(timeout=240)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], errors
    images = (tmp_path / "out.rank0").read_text().split()[0]
    assert [(tmp_path / f"out.rank{r}").read_text() for r in range(2)] == [f"{images} {images} {2 * int(images)}"] * 2
