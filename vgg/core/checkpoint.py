"""One way to write and read checkpoints.

A checkpoint is a dict with the keys below; `save_checkpoint` writes it atomically (temp file in the
same folder, fsync, rename), so a crash or `kill -9` mid-write leaves the previous file intact.
Training saves through a `CheckpointWriter`, which does that write on a background thread.

    model      state dict of the unwrapped, uncompiled VGG (torchvision-compatible keys)
    arch       model.arch_kwargs(): rebuilds the net with vgg.models.zoo.build_net(**arch)
    optimizer, scheduler   their state dicts
    epoch      epochs completed before this one; step: optimizer steps done within `epoch`
    lr_drops   how many times the plateau schedule has divided the lr
    world_size processes that trained it (a mid-epoch resume must use as many)
    rng        every RNG state (python, numpy, torch CPU, CUDA) for an exact resume
    config     the resolved run config (dict)
    stats      DatasetStats.to_dict(): mean RGB and colour PCA used in training and evaluation
    classes    the sorted wnids; class index i is classes[i]
    best_top1  best validation top-1 accuracy so far
    best       the best epoch's number and val top-1/top-5 errors (None before the first epoch ends)
    epoch_sums a mid-epoch save's metric sums of the epoch so far, [loss * images, top-1 hits,
               top-5 hits, images, skipped] over all ranks (None at an epoch boundary)

Everything in it is a tensor or a plain Python value (dict, list, str, number, None), so it is read
with `torch.load(weights_only=True)`: a file that would need any other type (a pickle that imports
`os.system`, say) is refused before any of it runs.
"""

import os
import random
import re
import tempfile
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from vgg.core.errors import UserError, is_disk_full

# What each use of a checkpoint needs in it.
MODEL_KEYS = ("model", "arch")
EVAL_KEYS = MODEL_KEYS + ("classes", "stats")
RESUME_KEYS = EVAL_KEYS + ("optimizer", "scheduler", "epoch", "step", "lr_drops", "rng", "config", "best_top1")
KEY_TYPES = {"model": dict, "arch": dict, "classes": list, "stats": dict, "optimizer": dict, "scheduler": dict,
             "epoch": int, "step": int, "lr_drops": int, "world_size": int, "rng": dict, "config": dict,
             "best_top1": (int, float)}
# Prefixes that wrappers add to parameter names: DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# A save waiting for its confirmation (CheckpointWriter): last.pt.pending.tmp, a temp file to the folder's cleanup.
PENDING_SUFFIX = ".pending.tmp"


def save_checkpoint(path, **state) -> None:
    """Write `state` to `path` atomically (no partial file is ever visible under `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; a checkpoint is a file like any other
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(e):
            raise UserError(f"no space left on device while writing {path} (the previous checkpoint "
                            "is intact; free space, then --resume)") from None
        raise


class CheckpointWriter:
    """`save_checkpoint` off the training thread: net D's 1.1 GB take seconds to write and fsync.

    `save` copies the state into CPU memory on the calling thread (the next training step changes the
    weights in place), then returns while a background thread writes the copy with save_checkpoint,
    atomically as ever. One write at a time: `save` first waits for the one before, and `close` must be
    called before the process exits. A failed write (a full disk: save_checkpoint's one-line UserError)
    is raised by the next `save`, `confirm` or `wait`, on the training thread.

    A `pending` save is written beside its path (PENDING_SUFFIX) and takes its place only once `confirm`
    says its weights gave a finite loss (the training loop's next sync, issue 34): a diverging step's
    weights never replace the last good checkpoint. `close` (at the run's end) drops one still unconfirmed;
    a kill leaves its file, which the next run removes (vgg.training.resume.remove_stale_temp_files).
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending: tuple[Path, Path] | None = None  # (written to, its place once confirmed)
        self._confirmed = False

    def save(self, path, *, pending: bool = False, **state) -> None:
        self.wait()
        self._drop_pending()  # (one never confirmed: the loop saves again before confirming it)
        state = cpu_copy(state)
        path = Path(path)
        target = path.with_name(path.name + PENDING_SUFFIX) if pending else path
        self._pending, self._confirmed = ((target, path), False) if pending else (None, False)
        self._thread = threading.Thread(target=self._write, args=(target, state), name="checkpoint-writer")
        self._thread.start()

    def _write(self, path: Path, state: dict) -> None:
        try:
            save_checkpoint(path, **state)
        except BaseException as e:  # raised on the training thread by the next save(), confirm() or wait()
            self._error = e

    def confirm(self) -> None:
        """The pending save's weights gave a finite loss: it takes its path once written (now, if it is)."""
        if self._pending is None:
            return
        self._confirmed = True
        if self._thread is None or not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        """Block until the last write (if any) is on disk, a confirmed pending one in its place; raise its
        error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            self._pending = None
            raise error
        if self._pending is not None and self._confirmed:
            os.replace(*self._pending)
            self._pending = None

    def close(self) -> None:
        """`wait`, then drop a pending save never confirmed: the run ends (its loss went NaN, or it failed)."""
        self.wait()
        self._drop_pending()

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._pending[0].unlink(missing_ok=True)
            self._pending = None


def cpu_copy(value):
    """`value` with every tensor copied into CPU memory (a copy even of a CPU tensor), dicts and lists rebuilt."""
    return map_tensors(lambda tensor: tensor.detach().to("cpu", copy=True), value)


def map_tensors(fn, value):
    """`value` with `fn` applied to every tensor in it, dicts, lists and tuples rebuilt."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_tensors(fn, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(fn, v) for v in value)
    return value


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def load_checkpoint(path, map_location="cpu", require=MODEL_KEYS) -> dict:
    """Read a checkpoint written by `save_checkpoint`, tensors and plain values only.

    UserError (one line naming the file) if it is missing, unreadable, refused as unsafe, or lacks
    one of the `require`d keys. Model keys lose any DDP `module.` / torch.compile `_orig_mod.` prefix.
    (vgg.models.checkpoint.load_net_checkpoint also takes torchvision's bare state dicts.)
    """
    path = Path(path)
    return check_checkpoint(read_checkpoint_file(path, map_location), path, require)


def read_checkpoint_file(path: Path, map_location="cpu") -> dict:
    """The dict a checkpoint file holds, read with weights_only; UserError if it is not one."""
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    check_integrity(path)
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": the one line below says enough
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, a type weights_only refuses ...
        if "Weights only load failed" in str(e):
            raise UserError(f"refused to load {path} (not a plain-tensor checkpoint: {_refusal(str(e))})") from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "empty or truncated file"
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {reason}") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a vgg-imagenet checkpoint (it holds a {type(ckpt).__name__})")
    return dense_tensors(ckpt)


def dense_tensors(value):
    """`value` with every tensor whose elements overlap or leave gaps (an expanded tensor, stride 0) copied
    into a contiguous one. torch.load lays a tensor out as the file's strides say, and a momentum buffer
    whose elements share memory made the fused SGD kernel crash (issue 34); torch.load itself refuses a
    storage too small for its tensor's shape and strides."""
    return map_tensors(lambda tensor: tensor if _is_dense(tensor) else tensor.contiguous(), value)


def _is_dense(tensor: torch.Tensor) -> bool:
    """Each element at a place of its own, no gaps: contiguous in some order of its dimensions (channels-last too)."""
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride()), key=lambda pair: pair[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def check_integrity(path: Path) -> None:
    """UserError (one line naming the file and the record) if a record of the zip torch.save wrote fails
    its CRC-32: torch.load never checks them, so a byte range overwritten on disk (a bad sector, a torn
    copy) would load as other weights and evaluate to other numbers. The extra read costs about 0.25 s per
    500 MB from the page cache (torch.load itself about 0.35 s); torch's legacy non-zip format has no
    checksums to check."""
    try:
        if not zipfile.is_zipfile(path):
            return  # (a truncated zip lands here too: torch.load then says it cannot read it)
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # every record read and its CRC-32 compared; the first bad one's name
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
        raise UserError(f"checkpoint {path} is damaged: {type(e).__name__}: {e}") from None
    if damaged is not None:
        raise UserError(f"checkpoint {path} is damaged: its record {damaged} fails its CRC-32 check (changed on "
                        "disk since it was written); use another copy or an earlier checkpoint")


def check_checkpoint(ckpt: dict, path: Path, require=MODEL_KEYS) -> dict:
    """UserError (one line naming the file) if `ckpt` lacks a `require`d key or holds one of the wrong type;
    its model keys without DDP `module.` / torch.compile `_orig_mod.` prefixes."""
    missing = [key for key in require if key not in ckpt]
    if missing:
        raise UserError(f"{path} has no {', '.join(missing)} entry: not a checkpoint train.py wrote, "
                        f"or not one that can be used here (needs {', '.join(require)})")
    for key, kind in KEY_TYPES.items():
        if key in ckpt and (not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool)):
            raise UserError(f"{path}: its '{key}' entry is a {type(ckpt[key]).__name__}, not a "
                            f"{getattr(kind, '__name__', 'number')}")
    if "model" in ckpt:
        ckpt["model"] = strip_wrapper_prefixes(ckpt["model"])
    return ckpt


def _refusal(message: str) -> str:
    """The one fact in torch's long weights_only message: what the file asked for."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return f"it imports {found.group(1)}"
    found = re.search(r"Unsupported operand (\w+)", message)
    return f"pickle opcode {found.group(1)} is not allowed" if found else "it holds other objects than tensors"


def strip_wrapper_prefixes(state: dict) -> dict:
    """Parameter names as the bare VGG has them: 'module._orig_mod.features.0.weight' -> 'features.0.weight'."""
    def strip(name: str) -> str:
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        return name

    return {strip(name): value for name, value in state.items()}


def rng_state() -> dict:
    """Every RNG state as tensors and plain values (numpy's key array as a list), for weights_only loading."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_python_state(state))
    np.random.set_state(_numpy_state(state))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_rng_state(state: dict) -> None:
    """Raise (KeyError, TypeError, ValueError, ...) if `state` would not load with set_rng_state: each part
    set on a scratch generator, the process's own RNGs untouched. CUDA's states are checked for their type
    only (their size depends on the device's generator)."""
    random.Random().setstate(_python_state(state))
    n = state["numpy"]
    if not isinstance(n["keys"], list) or len(n["keys"]) != 624 or not 0 <= n["pos"] <= 624:
        raise ValueError(f"numpy's MT19937 state needs 624 keys and a position in 0..624, not {len(n['keys'])} "
                         f"and {n['pos']}")
    np.random.RandomState().set_state(_numpy_state(state))
    torch.Generator().set_state(state["torch"])
    cuda = state.get("cuda", [])
    if not isinstance(cuda, (list, tuple)) or not all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda):
        raise TypeError("its cuda part is not a list of byte tensors")


def _python_state(state: dict) -> tuple:
    version, internal, gauss = state["python"]
    return version, tuple(internal), gauss


def _numpy_state(state: dict) -> tuple:
    n = state["numpy"]
    return n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]
