"""Cluster runs on CPU (gloo): SLURM's environment, a signal to one rank, requeue with auto-resume, templates."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, subprocess_env
from test_train import common_cli_args

from vgg.core.checkpoint import load_checkpoint
from vgg.core.distributed import DEFAULT_MASTER_PORT, expand_nodelist, slurm_process_env
from vgg.core.errors import UserError

SLURM_DIR = ROOT / "scripts" / "slurm"
TEMPLATES = sorted(SLURM_DIR.glob("*.sbatch"))


@pytest.mark.parametrize("nodelist, hosts", [
    ("localhost", ["localhost"]),
    ("node[1-3,5]", ["node1", "node2", "node3", "node5"]),
    ("gpu[08-10],login1", ["gpu08", "gpu09", "gpu10", "login1"]),
    ("a-b[7],c[2-3]", ["a-b7", "c2", "c3"]),
])
def test_expand_nodelist_reads_slurm_host_lists(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[1-3", "node[a-c]", ""])
def test_expand_nodelist_refuses_what_it_cannot_read(nodelist):
    with pytest.raises(UserError, match="MASTER_ADDR"):
        expand_nodelist(nodelist)


def test_slurm_env_becomes_torchrun_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol: the parser reads the node list
    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[03-04]",
            "SLURM_JOB_ID": "123456"}
    assert slurm_process_env(srun) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu03",
                                       "MASTER_PORT": str(DEFAULT_MASTER_PORT + 3456)}  # a port per job
    assert slurm_process_env({**srun, "MASTER_PORT": "1234"})["MASTER_PORT"] == "1234"
    assert slurm_process_env({**srun, "RANK": "0"}) == {}  # torchrun's environment wins
    assert slurm_process_env({"SLURM_JOB_ID": "7"}) == {}  # a batch script's own python: no srun task
    # Where SLURM is installed, scontrol expands the list (any form SLURM writes).
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho fromscontrol7\necho fromscontrol8\n")
    fake.chmod(0o755)
    assert slurm_process_env(srun)["MASTER_ADDR"] == "fromscontrol7"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_srun_job(args: list[str], job_id: str, restarts: int = 0) -> list[subprocess.Popen]:
    """Two train.py processes as plain `srun --ntasks 2` would start them (no torchrun): SLURM's variables."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(subprocess_env(), SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                   SLURM_JOB_ID=job_id, SLURM_JOB_NODELIST="localhost", SLURM_RESTART_COUNT=str(restarts),
                   MASTER_PORT=port)
        for name in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
            env.pop(name, None)
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], env=env, cwd=ROOT,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return procs


def test_usr1_on_one_rank_saves_exits_138_and_requeued_job_finishes(sample_root, tmp_path):
    # The template's command: the same each time the job starts, `--resume if-exists` included.
    def args(name):
        return [*common_cli_args(sample_root, tmp_path), "--run-name", name, "--resume", "if-exists", "--epochs", "2",
                "--steps-per-epoch", "10", "--batch-size", "16", "--workers", "0", "--log-every", "1"]

    straight = _finish_wait(_start_srun_job(args("straight"), "100"))
    assert [code for code, _ in straight] == [0, 0], straight[0][1][-3000:] + straight[1][1][-3000:]

    run_dir = tmp_path / "checkpoints" / "requeued"
    procs = _start_srun_job(args("requeued"), "200")
    deadline = time.time() + 120
    # config.yaml is written after both ranks passed the dataset barrier: rank 1's handler is in place.
    while not (run_dir / "config.yaml").exists() and time.time() < deadline and procs[0].poll() is None:
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGUSR1)  # one rank only, as a forwarded signal may reach one node first
    first = _finish_wait(procs)
    assert [code for code, _ in first] == [128 + signal.SIGUSR1] * 2, first[0][1][-3000:] + first[1][1][-3000:]
    assert "starting fresh" in first[0][1]
    assert "SIGUSR1 received" in first[1][1] and "SIGUSR1 received" not in first[0][1]
    assert all("Traceback" not in err for _, err in first)
    saved = load_checkpoint(run_dir / "last.pt")
    assert (saved["epoch"], saved["step"]) < (2, 0) and saved["step"] > 0  # stopped mid-epoch, saved there

    second = _finish_wait(_start_srun_job(args("requeued"), "200", restarts=1))  # the same command again
    assert [code for code, _ in second] == [0, 0], second[0][1][-3000:] + second[1][1][-3000:]
    assert "resuming" in second[0][1] and "(requeued job 200, restart 1)" in second[0][1]
    done, reference = (load_checkpoint(tmp_path / "checkpoints" / name / "last.pt")
                       for name in ("requeued", "straight"))
    assert (done["epoch"], done["step"]) == (reference["epoch"], reference["step"]) == (2, 0)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1]
    # The interrupted epoch's row covers all its images: the part before the stop and the part after.
    reference_rows = [json.loads(line) for line in
                      (tmp_path / "checkpoints" / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [row["train_images"] for row in rows] == [row["train_images"] for row in reference_rows]


def _finish_wait(procs) -> list[tuple[int, str]]:
    """Each process's exit code and stderr, once both have ended."""
    out = [p.communicate(timeout=300)[1] for p in procs]
    return [(p.returncode, err) for p, err in zip(procs, out)]


FAKE_SRUN = """#!/bin/bash
# Stands in for srun and the training step: records its arguments, saves and exits 138 at USR1.
echo "$@" > "$FAKE/srun_args"
trap 'echo "$@" > "$FAKE/stopped"; exit 138' USR1
echo $$ > "$FAKE/srun_pid"
while :; do sleep 0.05; done
"""
FAKE_SCANCEL = """#!/bin/bash
# scancel --signal=SIG JOB: the signal to the job step's processes (here: the fake srun).
echo "$@" >> "$FAKE/scancel"
kill -s "${1#--signal=}" "$(cat "$FAKE/srun_pid")"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1" in
  show) echo localhost ;;
  requeue) echo "$@" >> "$FAKE/requeue"; exit "$REQUEUE_RC" ;;
esac
"""


def test_templates_parse():
    assert {t.name for t in TEMPLATES} == {"train_1node.sbatch", "train_multinode.sbatch"}
    for path in [*TEMPLATES, SLURM_DIR / "requeue.sh"]:
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{path.name}: {result.stderr}"
        assert "--signal=B:USR1@300" in path.read_text() or path.name == "requeue.sh"


@pytest.mark.parametrize("template", ["train_1node.sbatch", "train_multinode.sbatch"])
@pytest.mark.parametrize("requeue_works", [True, False])
def test_template_forwards_usr1_and_requeues(template, requeue_works, tmp_path):
    """The batch script under fake srun/scancel/scontrol: SLURM's USR1 to the script reaches the job step,
    the job asks to be requeued, and the script exits with 138."""
    fake = tmp_path / "fake"
    bin_dir = fake / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE=str(fake), SLURM_JOB_ID="42",
               SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_NODELIST="localhost", SLURM_NNODES="2",
               SLURM_GPUS_PER_NODE="a100:2", SLURM_CPUS_PER_TASK="8", REQUEUE_RC="0" if requeue_works else "1")
    proc = subprocess.Popen(["bash", str(SLURM_DIR / template)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not (fake / "srun_pid").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` does
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 138, out
    assert (fake / "scancel").read_text().split() == ["--signal=USR1", "42"]
    assert (fake / "stopped").exists()  # the step got the signal and ended before the script did
    srun_args = (fake / "srun_args").read_text()
    assert "train.py" in srun_args and "--resume if-exists" in srun_args
    assert (fake / "requeue").read_text().split() == ["requeue", "42"]
    assert ("requeued job 42" if requeue_works else "submit the same script again") in out
    if template == "train_multinode.sbatch":
        assert "--nnodes 2 --nproc-per-node 2" in srun_args and "localhost:29542" in srun_args
        assert "--workers 4" in srun_args


def test_two_node_torchrun_on_localhost_trains_an_epoch(sample_root, tmp_path):
    """What one srun task per node runs in train_multinode.sbatch: torchrun --nnodes 2 with a c10d
    rendezvous, here as two torchrun agents of one process each on this machine."""
    endpoint = f"localhost:{_free_port()}"
    args = [*common_cli_args(sample_root, tmp_path), "--run-name", "nodes", "--resume", "if-exists", "--epochs", "1",
            "--steps-per-epoch", "3", "--batch-size", "16", "--workers", "0"]
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                                "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "test",
                                str(ROOT / "train.py"), *args],
                               env=subprocess_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]
    results = _finish_wait(agents)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert "2 x cpu" in results[0][1] + results[1][1]  # one job of two processes, not two jobs of one
    assert load_checkpoint(tmp_path / "checkpoints" / "nodes" / "last.pt")["epoch"] == 1
