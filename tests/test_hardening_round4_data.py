"""Hardening round 4 (issue 34), the data commands: shard keys that two files map to (7), a tarball file
name that two Hugging Face archives hold with other bytes (8), a full disk while writing shards (10)."""

import errno
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vgg.data.__main__ import main as data_main
from vgg.data.datasets.shards import ShardImages, open_split

WNID = "n01440764"


def image_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    """A small real image, different for each seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def class_folders(root: Path, names: list[str]) -> Path:
    """One class, the same files in train/ and val/."""
    for split in ("train", "val"):
        (root / split / WNID).mkdir(parents=True)
        for i, name in enumerate(names):
            (root / split / WNID / name).write_bytes(image_bytes(i, "PNG" if name.endswith(".png") else "JPEG"))
    return root


# --- 7. Two files of one class folder that map to one key ----------------------------------------------

def test_shards_keep_files_whose_names_map_to_one_key(tmp_path, capsys):
    """`a.b.JPEG` and `a_b.JPEG`, `pic.JPEG` and `pic.png`: one key each before, so side by side in a shard
    (the validation split keeps its order) they merged into one sample and the reader refused the shard
    (fewer samples than _info.json says); now every file is a sample of its own, its bytes as they were."""
    names = ["a.b.JPEG", "a_b.JPEG", "pic.JPEG", "pic.png", "pic_2.JPEG"]
    src = class_folders(tmp_path / "folders", names)
    assert data_main(["shards", str(src), str(tmp_path / "wds"), "--images-per-shard", "8"]) == 0, capsys.readouterr()
    for split in ("train", "validation"):
        images = ShardImages(open_split(tmp_path / "wds", split))
        keys = [sample[4] for sample in images.samples]
        assert len(keys) == len(set(keys)) == len(names) and not any("." in key for key in keys)
        read = set()
        for path, offset, size, *_ in images.samples:
            with open(path, "rb") as f:
                f.seek(offset)
                read.add(f.read(size))
        assert read == {(src / "train" / WNID / name).read_bytes() for name in names}


# --- 10. A full disk while writing shards -------------------------------------------------------------

def test_a_full_disk_while_writing_shards_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    src = class_folders(tmp_path / "folders", [f"{WNID}_{i}.JPEG" for i in range(6)])
    dest = tmp_path / "wds"
    dest.mkdir()
    stale = dest / ".imagenet1k-train-0001.tar.99999.tmp"  # what a run killed before left
    stale.write_bytes(b"half a shard")
    # Test fault injection: the 6th tar member written (inside the 2nd shard: 4 members a sample) hits a full disk.
    add, calls = tarfile.TarFile.addfile, []

    def addfile(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return add(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    assert data_main(["shards", str(src), str(dest), "--images-per-shard", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no space left on device while writing ") and "Traceback" not in "".join(err)
    assert sorted(p.name for p in dest.iterdir()) == ["imagenet1k-train-0000.tar"]  # no temporary, no _info.json
    monkeypatch.setattr(tarfile.TarFile, "addfile", add)
    stale.write_bytes(b"half a shard")
    assert data_main(["shards", str(src), str(dest), "--images-per-shard", "4"]) == 0
    assert not list(dest.glob(".*")), "a rerun removes the temporaries a failed run left"
    assert len(ShardImages(open_split(dest, "train"))) == 6


# --- 8. Two Hugging Face tarballs holding one file name ------------------------------------------------

def hf_tarball(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_prepare_hf_keeps_both_files_of_one_name_with_other_bytes(tmp_path, capsys, caplog):
    """`x_<wnid>.JPEG` in two archives, other bytes of the same size: the second was silently dropped (or,
    of another size, silently replaced the first). Now both are kept and a warning says so; the same bytes
    twice (`y`) are one file, silently; a rerun of the archives writes nothing new."""
    first = image_bytes(1)
    second = first[:600] + bytes([first[600] ^ 0xFF]) + first[601:]  # the same size: the old check took it for `first`
    same = image_bytes(3)
    hf_tarball(tmp_path / "src" / "train_images_0.tar.gz", {f"x_{WNID}.JPEG": first, f"y_{WNID}.JPEG": same})
    hf_tarball(tmp_path / "src" / "train_images_1.tar.gz", {f"x_{WNID}.JPEG": second, f"y_{WNID}.JPEG": same})
    hf_tarball(tmp_path / "src" / "val_images.tar.gz", {f"ILSVRC2012_val_00000001_{WNID}.JPEG": same})
    dest = tmp_path / "dest"
    assert data_main(["prepare", "--from", "hf", str(tmp_path / "src"), str(dest)]) == 0
    folder = dest / "train" / WNID
    assert sorted(p.name for p in folder.iterdir()) == ["x.JPEG", "x_2.JPEG", "y.JPEG"]
    assert (folder / "x.JPEG").read_bytes() == first and (folder / "x_2.JPEG").read_bytes() == second
    assert "train_images_1.tar.gz holds a second x.JPEG for train/n01440764/ with other bytes" in caplog.text
    assert "kept as x_2.JPEG" in caplog.text
    assert "4 extracted, 1 present, 1 renamed" in capsys.readouterr().out
    (dest / ".vgg_prepared.json").unlink()  # as after an interruption: the archives are read again
    caplog.clear()
    assert data_main(["prepare", "--from", "hf", str(tmp_path / "src"), str(dest)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["x.JPEG", "x_2.JPEG", "y.JPEG"]
    assert "(5 present)" in capsys.readouterr().out and "kept as" not in caplog.text
