"""Where a run starts from: a resumed checkpoint (what may change on resume, and how it is applied),
or a warm start from another net (§3.1: deeper nets from net A, re-scaled nets from their own kind).
"""

from pathlib import Path

from vgg.config import Config
from vgg.core.checkpoint import set_rng_state
from vgg.core.errors import UserError
from vgg.core.progress import get_logger
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


def restore_training_state(ckpt: dict, path: Path, model, optimizer, scheduler) -> None:
    """Weights, optimizer and scheduler state and RNGs from a resume checkpoint; one line if they do not fit."""
    load_model_state(model, ckpt["model"], path)
    kernel = sgd_kernel(next(model.parameters()).device)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])  # (its saved groups carry the saving run's kernel flags)
        for group in optimizer.param_groups:
            group.update({"fused": None, "foreach": None, **kernel})
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:300]
        raise UserError(f"{path}: its optimizer, scheduler or RNG state does not fit this run: "
                        f"{type(e).__name__}: {reason}") from None


def remove_stale_temp_files(run_dir: Path) -> None:
    """Temp files of saves killed mid-write (`kill -9`): as big as a checkpoint and of no use."""
    stale = list(run_dir.glob("*.pt.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info(f"removed {len(stale)} stale temp file(s) of an interrupted save from {run_dir}")
