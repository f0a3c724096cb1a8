"""The run folder and what rank 0 writes there: its lock, the checkpoint to resume, config.yaml, the
checkpoints, each epoch's row and lines, TensorBoard, the run's last line.
"""

import contextlib
import json
import os
from pathlib import Path

import yaml
from torch.utils.tensorboard import SummaryWriter

from vgg.core.checkpoint import rng_state
from vgg.core.distributed import broadcast_object, gather_objects, is_main_process
from vgg.core.errors import UserError
from vgg.core.progress import get_logger
from vgg.core.runlock import RunLock
from vgg.training.logs import (
    DASHBOARD_LAYOUT,
    NOT_IN_ROW,
    SKIPPED_LIST,
    hide_writer_thread_disk_full,
    log_epoch,
    read_skipped_list,
    write_skipped_list,
)
from vgg.training.parts import Position, RunParts
from vgg.training.resume import drop_rows_to_rewrite, remove_stale_temp_files

log = get_logger()


@contextlib.contextmanager
def hold_run_folder(*paths: Path):
    """Rank 0 holds the lock (vgg/core/runlock.py) of the run folder and of its TensorBoard folder for the
    whole run, taken before anything is written there; every rank refuses, in one line, a folder that a
    live run (fresh or resumed) holds. (Two runs with other --out-dir but one --log-dir and --run-name
    would write into one TensorBoard folder, the second hiding the first's curves: issue 34.)"""
    locks, refused = [], None
    folders = {}
    for path in map(Path, paths):
        folders.setdefault(path.resolve(), path)  # one lock when --log-dir is --out-dir
    if is_main_process():
        try:
            for path in folders.values():
                locks.append(RunLock(path))
        except UserError as e:
            refused = str(e)
    refused = broadcast_object(refused)
    try:
        if refused:
            raise UserError(refused)
        yield
    finally:
        for lock in locks:
            lock.release()


def find_resume_checkpoint(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint `--resume` names (None: a fresh run); a fresh run refuses a folder holding one."""
    if resume == "if-exists":  # the SLURM templates' choice: a requeued job goes on, a new run name starts
        resume = "auto" if broadcast_object((run_dir / "last.pt").is_file()) else ""  # rank 0's view, for all
        restarts, job = os.environ.get("SLURM_RESTART_COUNT", "0"), os.environ.get("SLURM_JOB_ID", "?")
        requeued = f" (requeued job {job}, restart {restarts})" if restarts != "0" else ""
        log.info(f"resuming {run_dir / 'last.pt'}{requeued}" if resume else
                 f"starting fresh: no {run_dir / 'last.pt'} yet")
    if not resume:
        if (run_dir / "last.pt").exists():
            raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, or a new --run-name")
        return None
    resume_path = run_dir / "last.pt" if resume == "auto" else Path(resume)
    if resume_path.is_dir():
        resume_path = resume_path / "last.pt"
    if not resume_path.is_file():
        raise UserError(f"nothing to resume: {resume_path} does not exist")
    return resume_path


def open_run_folder(parts: RunParts, resumed: bool) -> None:
    """Rank 0: the folder, its config.yaml, the skipped files so far, the TensorBoard writer, the first lines."""
    config, folder = parts.config, parts.folder
    folder.path.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(folder.path)
    config_text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    (folder.path / "config.yaml").write_text(config_text)
    if resumed and (folder.path / SKIPPED_LIST).is_file():
        folder.skipped_files = read_skipped_list(folder.path / SKIPPED_LIST)
    if resumed:  # each epoch's row once: those the resumed run trains again go
        drop_rows_to_rewrite(folder.path / "metrics.jsonl", parts.position.epoch)
    # Every scalar's x axis is the global optimizer step. Events after the step this run starts
    # from (those logged before an interruption, or by a run resumed from a later checkpoint)
    # are dropped when TensorBoard reads the folder, as this run logs those steps again: no curve
    # shows a doubled segment. A fresh run drops everything a former run left in the folder.
    last_step = parts.position.epoch * parts.data.steps_per_epoch + parts.position.step
    hide_writer_thread_disk_full()
    folder.writer = SummaryWriter(str(Path(config.log_dir) / config.run_name),
                                  purge_step=last_step + 1 if resumed else 0)
    folder.writer.add_custom_scalars(DASHBOARD_LAYOUT)
    folder.writer.add_text("config", "```\n" + config_text + "```", 0)
    data, device, speed = parts.data, parts.dist.device, parts.speed
    log.info(f"net {config.arch}: {sum(p.numel() for p in parts.net.raw.parameters()):,} parameters, "
             f"{len(data.classes)} classes, {len(data.train_set)} train / {len(data.val_set)} val images, "
             f"{data.steps_per_epoch} steps/epoch of {config.batch_size} on {parts.dist.world_size} x {device.type}")
    log.info(f"speed settings on {device.type}: bf16 autocast {_on_off(speed.bf16)}, channels-last "
             f"{_on_off(speed.channels_last)}, torch.compile {_on_off(speed.compile)}")
    log.info(f"run folder {folder.path}; TensorBoard: tensorboard --logdir {config.log_dir}")


def save(parts: RunParts, names: tuple[str, ...], epoch: int, step: int, epoch_sums: list[float] | None = None,
         pending: bool = False) -> None:
    """One checkpoint under each of `names` (vgg/core/checkpoint.py), written by rank 0 in the background, from
    one gather of the ranks' RNG states (an improving epoch's best.pt and last.pt). epoch_sums: the metric
    sums of a part-done epoch's steps 0..step-1, so its row covers it all. pending: in its place once
    confirmed (CheckpointWriter). Every rank calls it: each one's RNG state goes in (its dropout masks are its
    own, and the ranks' streams part as soon as their batches do: a batch that lost an unreadable file draws
    fewer), so a resume gives each rank back its own."""
    rngs = gather_objects(rng_state())
    if not is_main_process():
        return
    net, position = parts.net, parts.position
    state = dict(model=net.raw.state_dict(), arch=net.raw.arch_kwargs(), optimizer=net.optimizer.state_dict(),
                 scheduler=net.scheduler.state_dict(), epoch=epoch, step=step, lr_drops=position.lr_drops,
                 world_size=parts.dist.world_size, rng=rngs[0], rank_rng=rngs if len(rngs) > 1 else None,
                 config=parts.config.to_dict(), stats=parts.data.stats.to_dict(), classes=parts.data.classes,
                 best_top1=position.best_top1, best=position.best, epoch_sums=epoch_sums,
                 train_files=parts.data.train_files)
    for name in names:
        parts.folder.checkpoints.save(parts.folder.path / name, pending=pending, **state)


def record_epoch(parts: RunParts, epoch: int, last_step: int, epoch_lr: float, next_lr: float, train_metrics: dict,
                 val_metrics: dict) -> None:
    """The epoch's row in metrics.jsonl and TensorBoard, its console line, and every rank's unreadable files
    in skipped.txt. lr: the one this epoch trained with; lr_drops: the drops made so far, this epoch's
    plateau check included (so an epoch that triggers a drop shows its own lr and the new count)."""
    config, folder = parts.config, parts.folder
    row = {"epoch": epoch, "lr": epoch_lr, "lr_drops": parts.position.lr_drops,
           **{f"train_{k}": v for k, v in train_metrics.items() if k not in NOT_IN_ROW},
           **{f"val_{k}": v for k, v in val_metrics.items() if k not in NOT_IN_ROW}}
    unreadable = gather_objects(train_metrics["unreadable"] + val_metrics["unreadable"])  # one gather an epoch
    if not is_main_process():
        return
    with open(folder.path / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    log_epoch(folder.writer, last_step, row, parts.dist.device)
    dropped = (f", dropped to {next_lr:g} (lr drop {parts.position.lr_drops} of {config.max_lr_drops})"
               if next_lr < epoch_lr else "")
    speed = (f"{train_metrics['images_per_s']:.0f} img/s" if train_metrics["images_per_s"] is not None else
             "trained before the resume")
    log.info(f"epoch {epoch}: train loss {train_metrics['loss']:.3f}, top-1 err "
             f"{train_metrics['top1_err']:.1f}% | val top-1 err {val_metrics['top1_err']:.1f}%, "
             f"top-5 err {val_metrics['top5_err']:.1f}% | {speed} | lr {epoch_lr:g}{dropped}")
    list_skipped_files(folder, unreadable)


def list_skipped_files(folder, unreadable: list[list]) -> None:
    """Rank 0: every rank's unreadable files (gather_objects of each rank's list) into skipped.txt. Said once
    per file: a line only when files the list does not hold yet were met (each epoch's count is in its
    row); validation meets the same unreadable files every epoch."""
    found = {f.path: f.reason for rank_files in unreadable for f in rank_files}
    new = found.keys() - folder.skipped_files.keys()
    if new:
        folder.skipped_files.update(found)
        write_skipped_list(folder.path / SKIPPED_LIST, folder.skipped_files)
        log.info(f"{len(new)} unreadable files met for the first time, {len(folder.skipped_files)} in all; "
                 f"list in {folder.path / SKIPPED_LIST}")


def finish_run(parts: RunParts, last_step: int) -> None:
    """Rank 0: the hyper-parameters beside the best epoch's errors (those of best.pt, which evaluation
    starts from) in TensorBoard, and the run's last line."""
    best, best_top1 = parts.position.best, parts.position.best_top1
    if best is not None:
        final = {"hparam/val_top1_err": best["val_top1_err"], "hparam/val_top5_err": best["val_top5_err"],
                 "hparam/best_epoch": best["epoch"]}
    else:  # resumed from a checkpoint that kept only the best accuracy
        final = {"hparam/val_top1_err": 100 - best_top1}
    hparams = {k: v for k, v in parts.config.to_dict().items() if isinstance(v, (int, float, str, bool))}
    writer = parts.folder.writer
    writer.flush()  # a failed event write (a full disk) is raised by flush; close would drop it unsaid
    writer.add_hparams(hparams, final, run_name=".", global_step=last_step)  # purged on resume, like the rest
    writer.close()
    log.info(f"done: {best_so_far(parts.position)}; checkpoints in {parts.folder.path}")


def best_so_far(position: Position) -> str:
    """'best val top-1 err 31.2% (epoch 40)': the best epoch's (that of best.pt), or its accuracy alone (older
    checkpoints name no epoch)."""
    where = f" (epoch {position.best['epoch']})" if position.best is not None else ""
    return f"best val top-1 err {100 - position.best_top1:.1f}%{where}"


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"
