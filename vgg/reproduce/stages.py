"""Running the plan: each stage in this process (one process) or as its command in a subprocess
(--gpus N > 1), complete stages skipped, the report rewritten after every stage that ran.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from vgg.config import FIELDS, Config, ensure_writable_dir, get_args_parser
from vgg.core.distributed import set_cpu_threads
from vgg.core.errors import UserError
from vgg.reproduce.plan import (
    MARKER,
    ROOT,
    EvalStage,
    Settings,
    TrainStage,
    command_text,
    eval_argv,
    eval_scales,
    eval_status,
    plan,
    select_stages,
    train_argv,
)
from vgg.reproduce.report import write_report

# --- Running stages ----------------------------------------------------------------------------------


class StageFailed(Exception):
    """A stage's subprocess failed; it has printed its own error. Carries the exit code."""

    def __init__(self, stage: str, code: int):
        super().__init__(f"stage {stage} failed with exit code {code}")
        self.code = code


def run_subprocess(stage_name: str, script: str, argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / script), *argv])
    if proc.returncode != 0:
        raise StageFailed(stage_name, proc.returncode)


def run_train_stage(stage: TrainStage, status: str, settings: Settings) -> None:
    argv = train_argv(stage, settings)
    if settings.gpus > 1:  # train.py runs itself under torchrun
        run_subprocess(stage.name, "train.py", train_argv(stage, settings, status == "resume"))
    else:
        from vgg.config import check_output_dirs, resolve_config
        from vgg.training.run import run

        parser = argparse.ArgumentParser(parents=[get_args_parser()])  # train.py's own flags
        config = resolve_config(parser.parse_args(argv))
        check_output_dirs(config)
        run(config, resume="auto" if status == "resume" else "")
    marker = {"stage": stage.name, "scale": settings.scale, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": command_text("train.py", argv)}
    (settings.run_dir(stage.name) / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def run_eval_stage(stage: EvalStage, settings: Settings) -> None:
    argv = eval_argv(stage, settings)
    if settings.gpus > 1:  # evaluate.py shards the images over N processes
        run_subprocess(stage.name, "evaluate.py", argv)
        return
    from vgg.core.distributed import init_distributed
    from vgg.evaluation.nets import load_eval_net
    from vgg.evaluation.report import write_results
    from vgg.evaluation.runner import evaluate_dataset

    scales = eval_scales(stage, settings)
    nets = [load_eval_net(settings.best(net), scales=scales) for net in stage.nets]
    device = init_distributed(settings.runtime_value("device")).device
    result = evaluate_dataset(nets, Path(settings.data) / "val", methods=list(stage.methods), device=device,
                              workers=settings.runtime_value("workers"), bf16=settings.runtime_value("bf16"),
                              channels_last=settings.runtime_value("channels_last"))
    write_results(result, settings.eval_out(stage.name))


def reproduce(settings: Settings, patterns: list[str] | None, dry_run: bool) -> int:
    """Run (or with dry_run print) the selected stages in order, then write the report."""
    steps = plan(select_stages(patterns), settings)
    verb = {"done": "complete, skipped", "resume": "interrupted, resuming", "run": "to run"}
    if dry_run:
        for i, (stage, status, command) in enumerate(steps, 1):
            print(f"[{i}/{len(steps)}] {stage.name}: {verb[status]}\n    {command}")
        return 0
    ensure_writable_dir(settings.out_dir, "--out-dir")
    ensure_writable_dir(settings.log_dir, "--log-dir")
    if settings.runtime.get("gpus", 1) <= 1:  # stages run in this process: its threads, as train.py's
        set_cpu_threads(settings.runtime.get("device", FIELDS["device"].default),
                        settings.runtime.get("workers", FIELDS["workers"].default))
    from vgg.training.build import prepare_dataset

    prepare_dataset(Config(data=settings.data))  # generates the sample dataset on first use; checks train/, val/
    for i, (stage, status, command) in enumerate(steps, 1):
        if isinstance(stage, EvalStage):
            status = eval_status(stage, settings)  # a checkpoint may have changed since the plan was made
        print(f"[{i}/{len(steps)}] {stage.name}: {verb[status]}", flush=True)
        if status == "done":
            continue
        print(f"    {command}", flush=True)
        start = time.perf_counter()
        try:
            if isinstance(stage, TrainStage):
                run_train_stage(stage, status, settings)
            else:
                run_eval_stage(stage, settings)
        except UserError as e:
            raise UserError(f"stage {stage.name}: {e}") from None
        print(f"[{i}/{len(steps)}] {stage.name}: done in {time.perf_counter() - start:.0f} s", flush=True)
        write_report(settings)  # kept current while a long plan runs
    md_path, json_path = write_report(settings)
    print(f"report: {md_path} ({json_path}); training curves also in TensorBoard: "
          f"tensorboard --logdir {settings.log_dir}")
    return 0
