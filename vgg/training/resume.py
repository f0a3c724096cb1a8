"""Where a run starts from: a resumed checkpoint (every field checked, what may change on resume and how
it is applied, the run folder's rows trimmed to it), or a warm start from another net (§3.1: deeper nets
from net A, re-scaled nets from their own kind).
"""

import json
import math
import os
from pathlib import Path
from typing import NoReturn

import torch

from vgg.config import Config
from vgg.core.checkpoint import check_rng_state, set_rng_state
from vgg.core.distributed import get_rank, get_world_size
from vgg.core.errors import UserError
from vgg.core.progress import get_logger
from vgg.data.datasets.stats import DatasetStats
from vgg.models.checkpoint import build_model_from_checkpoint, load_model_state
from vgg.models.vgg import warm_start
from vgg.models.zoo import VGG_ARCHS
from vgg.training.recipe import sgd_kernel

log = get_logger()


def init_from_checkpoint(model, source_ckpt: dict, path: str, classes: list[str]) -> list[str]:
    """§3.1: a deeper net warm-starts from net A; a re-scaled net (S=384, jitter) from its own kind."""
    source_arch = source_ckpt["arch"]
    if source_ckpt.get("classes") and source_ckpt["classes"] != classes:  # (torchvision's weights name none)
        raise UserError(f"--init-from {path}: its {len(source_ckpt.get('classes', []))} classes differ "
                        f"from this dataset's {len(classes)}")
    source = build_model_from_checkpoint(source_ckpt, path)
    if source_arch["name"] == model.arch_name:
        if source_arch != model.arch_kwargs():
            raise UserError(f"--init-from {path}: net {source_arch} does not match this run's "
                            f"{model.arch_kwargs()}")
        load_model_state(model, source.state_dict(), path)
        return list(model.state_dict())
    if source_arch["name"] != "A" or model.arch_name not in VGG_ARCHS:  # §3.1's warm start is VGG's alone
        raise UserError(f"--init-from {path} holds net {source_arch['name']}; net {model.arch_name} "
                        "warm-starts from net A or from a net of its own kind")
    return warm_start(model, source)


# How `--resume` treats a setting that differs from the checkpoint's config (see resume_changes).
RESUME_APPLIED = ("lr", "momentum", "weight_decay", "patience", "max_lr_drops", "epochs",
                  "workers", "data_path", "data", "device", "bf16", "compile", "channels_last", "cudnn_benchmark",
                  "log_every", "checkpoint_every", "log_dir", "out_dir", "run_name", "progress_every_s")
RESUME_AT_EPOCH_BOUNDARY = ("batch_size", "gpus", "world_size", "steps_per_epoch")


def resume_changes(config: Config, ckpt: dict, path: Path, world_size: int) -> list[tuple[str, object, object]]:
    """The settings that differ from the checkpoint's, as (field, old, new); UserError for any that may not.

    Per field, never silently:
    - applied from now on, each logged as "lr 0.01 -> 0.005 on resume": the optimisation settings lr
      (the optimizer's current lr is set to it; the count of plateau drops is kept), momentum,
      weight_decay, patience, max_lr_drops, epochs; and how/where the run executes and writes:
      workers, data_path, data (a moved dataset), device, bf16, compile, channels_last,
      cudnn_benchmark, log_every, checkpoint_every, log_dir, out_dir, run_name (continue in a new
      folder), progress_every_s;
    - batch_size, gpus, the number of processes and steps_per_epoch: applied at an epoch boundary,
      refused for a mid-epoch checkpoint (the resumed epoch would re-train or skip images);
    - everything else (arch, width, fc_width, dropout, init, init_from, crop and scales, val_scale,
      stats, stats_images, color_shift_std, lr_factor, bias_decay, seed): refused, since it defines
      the run; one error lists every such field with old and new values.
    """
    saved = dict(ckpt["config"], world_size=ckpt.get("world_size", world_size))
    current = dict(config.to_dict(), world_size=world_size)
    changes = [(name, saved.get(name), value) for name, value in current.items() if saved.get(name) != value]
    mid_epoch = ckpt["step"] > 0
    refused = [c for c in changes if c[0] not in RESUME_APPLIED
               and (mid_epoch or c[0] not in RESUME_AT_EPOCH_BOUNDARY)]
    if refused:
        listed = ", ".join(f"{name} {old!r} -> {new!r}" for name, old, new in refused)
        boundary = (f"; batch size, processes and steps per epoch change only at an epoch boundary (it is at "
                    f"epoch {ckpt['epoch']}, step {ckpt['step']})" if mid_epoch else "")
        raise UserError(f"cannot resume {path} with changed {listed}: may change on resume: "
                        f"{', '.join(RESUME_APPLIED)}{boundary}; train under a new --run-name to change the rest")
    return changes


def apply_resume_changes(changes, optimizer, scheduler, config: Config) -> None:
    """Put the changed optimisation settings into the restored optimizer and scheduler, and log each change."""
    restored_lr = optimizer.param_groups[0]["lr"]
    for name, old, new in changes:
        note = f" (the optimizer's lr was {restored_lr:g})" if name == "lr" and restored_lr != old else ""
        log.info(f"{name} {old} -> {new} on resume{note}")
        if name == "lr":  # unchanged, the restored (maybe already dropped) lr stays
            for group in optimizer.param_groups:
                group["lr"] = config.lr
    for group in optimizer.param_groups:
        group["momentum"] = config.momentum
    optimizer.param_groups[0]["weight_decay"] = config.weight_decay  # group 1, if any: biases, no decay
    scheduler.patience = config.patience


# --- A resume checkpoint is input: every field checked before anything trains --------------------------
#
# load_checkpoint checked that the entries are there, of the right types. Their contents reach code that
# trusts them: a momentum buffer of another shape makes the fused SGD kernel write out of bounds (a
# segmentation fault), a scheduler's `best` string fails after an epoch's training, a step beyond the
# epoch trains nothing and a NaN sum writes a NaN row without a word. So each field is checked here, each
# misfit one line naming the file and the field: check_resume_checkpoint before the data scan,
# check_checkpoint_fits_run against the built net and the epoch's steps before anything is restored.

# The plateau schedule's state: what changes as it runs (or is re-applied on resume: patience); every
# other field of its state dict is a constant of the recipe and must be what this code builds.
_SCHEDULER_STATE = ("best", "num_bad_epochs", "cooldown_counter", "last_epoch", "_last_lr", "patience")
# SGD's group settings resume sets anew (apply_resume_changes; weight_decay in group 0 only), or that
# follow the device (sgd_kernel); lr is the run's state (drops); every other one must be this run's.
_GROUP_STATE = ("params", "lr", "momentum", "fused", "foreach", "param_names")


def _refuse(path: Path, field: str, problem: str) -> NoReturn:
    raise UserError(f"{path}: its '{field}' entry {problem}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_resume_checkpoint(ckpt: dict, path: Path, config: Config) -> None:
    """UserError, one line naming the file and the field, for any field of a resume checkpoint that is
    not as train.py writes it (against its own config), or places it past this run's --epochs. Needs no
    data and no net: it runs before the data scan. (check_checkpoint_fits_run does the rest.)"""
    _check_position(ckpt, path, ckpt["config"])
    _check_best(ckpt, path)
    _check_epoch_sums(ckpt, path)
    _check_optimizer_layout(ckpt["optimizer"], path)
    _check_scheduler(ckpt["scheduler"], path, len(ckpt["optimizer"]["param_groups"]), ckpt["config"])
    _check_rng(ckpt, path)
    try:
        DatasetStats.from_dict(ckpt["stats"])
    except UserError as e:
        _refuse(path, "stats", f"does not load: {e}")
    for name, tensor in ckpt["model"].items():  # (shapes: load_model_state, against the net)
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            _refuse(path, "model", f"holds NaN/inf in {name}")
    needed = ckpt["epoch"] + (ckpt["step"] > 0)  # a part-done epoch is one more to train
    if needed > config.epochs:
        raise UserError(f"{path} is at epoch {ckpt['epoch']}, step {ckpt['step']}: past --epochs {config.epochs}; "
                        f"pass --epochs {needed} or more to resume it")


def _check_position(ckpt: dict, path: Path, saved: dict) -> None:
    """epoch, step, lr_drops, world_size: in range, and within the run its config describes."""
    epochs, steps = saved.get("epochs"), saved.get("steps_per_epoch")
    epoch, step = ckpt["epoch"], ckpt["step"]
    if epoch < 0 or (_is_count(epochs) and epoch > epochs):
        _refuse(path, "epoch", f"is {epoch}, outside 0..{epochs} (epochs in its config)")
    # (step == steps: the epoch's steps all done, its validation not: a stop at its last step, issue 34)
    limit = steps if _is_count(steps) and steps > 0 else None  # (0: every full batch, known after the scan)
    if step < 0 or (limit and step > limit):
        _refuse(path, "step", f"is {step}, outside 0..{limit} (steps per epoch in its config)" if limit
                else f"is {step}, not a count")
    if step > 0 and _is_count(epochs) and epoch == epochs:
        _refuse(path, "step", f"is {step} in epoch {epoch}, after the last of its config's {epochs} epochs")
    if ckpt["lr_drops"] < 0:
        _refuse(path, "lr_drops", f"is {ckpt['lr_drops']}, not a count")
    if ckpt.get("world_size", 1) < 1:
        _refuse(path, "world_size", f"is {ckpt['world_size']}, not a number of processes")


def _check_rng(ckpt: dict, path: Path) -> None:
    """rng: the RNG states of rank 0; rank_rng: None, or those of each of the world_size ranks that saved it."""
    states, ranks = ckpt.get("rank_rng"), ckpt.get("world_size", 1)
    if states is not None and not (isinstance(states, list) and len(states) == ranks > 1):
        _refuse(path, "rank_rng", f"is not None or a list of the RNG states of its {ranks} processes")
    for field, state in [("rng", ckpt["rng"]), *(("rank_rng", s) for s in states or [])]:
        try:
            check_rng_state(state)
        except (KeyError, IndexError, TypeError, ValueError, OverflowError, RuntimeError) as e:
            _refuse(path, field, f"does not load as RNG states: {type(e).__name__}: {' '.join(str(e).split())[:200]}")


def _check_best(ckpt: dict, path: Path) -> None:
    """best_top1 an accuracy (-1 before the first epoch); best None or the best epoch's errors, agreeing."""
    top1, best = ckpt["best_top1"], ckpt.get("best")
    if not (math.isfinite(top1) and -1 <= top1 <= 100):
        _refuse(path, "best_top1", f"is {top1}, not a top-1 accuracy in 0..100 (or -1 before the first epoch)")
    if best is None:
        return
    errors = ("val_top1_err", "val_top5_err")
    if (not isinstance(best, dict) or set(best) != {"epoch", *errors} or not _is_count(best["epoch"])
            or not all(_is_number(best[k]) and 0 <= best[k] <= 100 for k in errors)):
        _refuse(path, "best", f"is {str(best)[:100]}, not None or {{epoch, val_top1_err, val_top5_err}} "
                              "(an epoch number and two errors in %)")
    if best["epoch"] >= ckpt["epoch"]:
        _refuse(path, "best", f"names epoch {best['epoch']}, not one of the {ckpt['epoch']} it has trained")
    if abs(best["val_top1_err"] - (100 - top1)) > 1e-6:
        _refuse(path, "best", f"has val_top1_err {best['val_top1_err']}, but its best_top1 {top1} makes it "
                              f"{100 - top1}")


def _check_epoch_sums(ckpt: dict, path: Path) -> None:
    """None at an epoch boundary; mid-epoch (absent in older checkpoints, else) the epoch's five sums so far."""
    sums = ckpt.get("epoch_sums")
    if sums is None:
        return
    if ckpt["step"] == 0:
        _refuse(path, "epoch_sums", "holds sums at step 0, an epoch boundary, where a run carries none")
    if (not isinstance(sums, list) or len(sums) != 5
            or not all(_is_number(s) and math.isfinite(s) and s >= 0 for s in sums)):
        _refuse(path, "epoch_sums", f"is {str(sums)[:100]}, not 5 finite sums (loss * images, top-1 hits, "
                                    "top-5 hits, images, skipped images)")
    if not sums[1] <= sums[2] <= sums[3]:
        _refuse(path, "epoch_sums", f"counts more hits than images ({sums[1]:g} top-1, {sums[2]:g} top-5, "
                                    f"{sums[3]:g} images)")


def _check_optimizer_layout(optimizer: dict, path: Path) -> None:
    """SGD's state dict as torch writes it: groups numbering each parameter once, a momentum buffer each."""
    groups, state = optimizer.get("param_groups"), optimizer.get("state")
    if (not isinstance(groups, list) or not groups or not isinstance(state, dict)
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        _refuse(path, "optimizer", "is not an optimizer's state dict (state, and a list of parameter groups)")
    indices = [i for g in groups for i in g["params"]]
    if not all(_is_count(i) for i in indices) or len(set(indices)) != len(indices):
        _refuse(path, "optimizer", "numbers a parameter twice, or not by a count")
    for index, entry in state.items():
        if index not in indices or not isinstance(entry, dict) or set(entry) - {"momentum_buffer"}:
            _refuse(path, "optimizer", f"holds a state {str(entry)[:60]} for parameter {index}, not SGD's "
                                       "momentum buffer of a parameter in its groups")
        buffer = entry.get("momentum_buffer")
        if buffer is not None and not (isinstance(buffer, torch.Tensor) and buffer.is_floating_point()):
            _refuse(path, "optimizer", f"holds a momentum buffer for parameter {index} that is no float tensor")


def _check_scheduler(scheduler: dict, path: Path, num_groups: int, saved: dict) -> None:
    """ReduceLROnPlateau's state dict: its running state in range, every other field the recipe's."""
    factor, patience = saved.get("lr_factor", 0.1), saved.get("patience", 10)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(
        torch.optim.SGD([{"params": [torch.zeros(1)]} for _ in range(num_groups)], lr=1.0), mode="max",
        factor=factor if _is_number(factor) and 0 < factor < 1 else 0.1,
        patience=patience if _is_count(patience) else 10).state_dict()
    unknown = sorted(set(scheduler) - set(reference))
    if unknown:
        _refuse(path, "scheduler", f"has unknown field(s) {', '.join(map(str, unknown))}")
    for key in ("best", "num_bad_epochs", "last_epoch"):
        if key not in scheduler:
            _refuse(path, "scheduler", f"has no {key}")
    for key, value in scheduler.items():
        if key == "best":
            ok, wanted = _is_number(value) and not math.isnan(value), "a number"
        elif key == "_last_lr":
            ok = (isinstance(value, list) and len(value) == num_groups
                  and all(_is_number(v) and math.isfinite(v) and v > 0 for v in value))
            wanted = f"{num_groups} learning rate(s)"
        elif key in _SCHEDULER_STATE:
            ok, wanted = _is_count(value), "a count"
        else:  # (a number by value: torch may write 0 where it once wrote 0.0)
            ok = value == reference[key] and (type(value) is type(reference[key])
                                              or _is_number(value) and _is_number(reference[key]))
            wanted = repr(reference[key])
        if not ok:
            _refuse(path, "scheduler", f"has {key} {str(repr(value))[:60]}, not {wanted}")


def check_checkpoint_fits_run(ckpt: dict, path: Path, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> None:
    """UserError, one line naming the file and the field, if the checkpoint's step is not one of this run's
    epoch, or its SGD state does not fit the built net's parameter groups (group sizes, settings, each
    momentum buffer's shape and finiteness): torch's load_state_dict checks the sizes only, and the fused
    kernel trusts each buffer's shape. Before anything is restored; the weights' shapes are load_model_state's."""
    if ckpt["step"] > steps_per_epoch:
        _refuse(path, "step", f"is {ckpt['step']}, outside 0..{steps_per_epoch} (this run's steps per epoch)")
    saved_groups, state = ckpt["optimizer"]["param_groups"], ckpt["optimizer"]["state"]
    sizes = [len(g["params"]) for g in saved_groups]
    built = [len(g["params"]) for g in optimizer.param_groups]
    if sizes != built:
        _refuse(path, "optimizer", f"has {len(sizes)} parameter groups ({', '.join(map(str, sizes))} parameters), "
                                   f"this run's net {len(built)} ({', '.join(map(str, built))})")
    for g, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
        _check_group_settings(saved, group, g, path)
        for index, param in zip(saved["params"], group["params"]):
            buffer = state.get(index, {}).get("momentum_buffer")
            if buffer is None:
                continue
            if buffer.shape != param.shape:
                _refuse(path, "optimizer", f"holds a momentum buffer of shape {tuple(buffer.shape)} for parameter "
                                           f"{index} (group {g}) of shape {tuple(param.shape)}")
            if not torch.isfinite(buffer).all():
                _refuse(path, "optimizer", f"holds NaN/inf in the momentum buffer of parameter {index} (group {g})")


def _check_group_settings(saved: dict, group: dict, g: int, path: Path) -> None:
    """One SGD group's settings: lr a learning rate, the rest this run's (those resume sets anew: numbers)."""
    lr = saved.get("lr")
    if not (_is_number(lr) and math.isfinite(lr) and lr > 0):
        _refuse(path, "optimizer", f"has lr {lr} in parameter group {g}, not a learning rate")
    for key, value in group.items():
        if key in _GROUP_STATE or (key == "weight_decay" and g == 0):
            continue
        if key in ("dampening", "weight_decay") and key not in saved:  # (SGD fills in the others' defaults)
            _refuse(path, "optimizer", f"has no {key} in parameter group {g}")
        if key in saved and saved[key] != value:
            _refuse(path, "optimizer", f"has {key} {saved[key]} in parameter group {g}, not this run's {value}")


def restore_training_state(ckpt: dict, path: Path, model, optimizer, scheduler) -> None:
    """Weights, optimizer and scheduler state and RNGs from a resume checkpoint; one line if they do not fit."""
    load_model_state(model, ckpt["model"], path)
    kernel = sgd_kernel(next(model.parameters()).device)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])  # (its saved groups carry the saving run's kernel flags)
        for group in optimizer.param_groups:
            group.update({"fused": None, "foreach": None, **kernel})
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(own_rng_state(ckpt))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:300]
        raise UserError(f"{path}: its optimizer, scheduler or RNG state does not fit this run: "
                        f"{type(e).__name__}: {reason}") from None


def own_rng_state(ckpt: dict) -> dict:
    """This rank's RNG states from a checkpoint: its own where the checkpoint holds one per process of as many
    processes as this run has (bit-exact dropout on every rank), else rank 0's (a run with another count)."""
    states = ckpt.get("rank_rng")
    if isinstance(states, list) and len(states) == get_world_size():
        return states[get_rank()]
    return ckpt["rng"]


def remove_stale_temp_files(run_dir: Path) -> None:
    """Temp files of saves killed mid-write (`kill -9`): as big as a checkpoint and of no use."""
    stale = list(run_dir.glob("*.pt.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info(f"removed {len(stale)} stale temp file(s) of an interrupted save from {run_dir}")


def drop_rows_to_rewrite(metrics: Path, epoch: int) -> None:
    """metrics.jsonl as it stood when the checkpoint a run resumes from was saved: the rows of the `epoch`
    epochs it had trained. A row of a later epoch was written after it (a save that then failed on a full
    disk, a resume from an earlier checkpoint) and the resumed run writes it again; a row cut short by a
    crash mid-append reads as no JSON. Rewritten atomically, and said in the log."""
    if not metrics.is_file():
        return
    kept, dropped, unreadable = [], 0, 0
    for line in metrics.read_text().splitlines():
        try:
            row_epoch = json.loads(line)["epoch"] if line.strip() else None
        except (ValueError, TypeError, KeyError):
            row_epoch = "unreadable"
        if isinstance(row_epoch, int) and row_epoch < epoch:
            kept.append(line)
        elif isinstance(row_epoch, int):
            dropped += 1
        elif line.strip():
            unreadable += 1
    if not dropped and not unreadable:
        return
    temp = metrics.with_name(metrics.name + ".tmp")
    temp.write_text("".join(line + "\n" for line in kept))
    os.replace(temp, metrics)
    log.info(f"{metrics}: dropped {dropped} row(s) of epoch {epoch} and later, which the resumed run writes "
             f"again{f', and {unreadable} unreadable line(s)' if unreadable else ''}")
