"""`python -m vgg.data prepare --from {devkit,kaggle,hf}`: a tiny fake of each download, built from real
JPEGs of the sample set, prepared with the real CLI, then trained on (train.py) or evaluated."""

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, assert_one_line_error, subprocess_env
from test_train import train_cli

CLASSES = ["n00000000", "n00000003", "n00000007", "n00000010"]  # sorted wnid order = class index
TRAIN_PER_CLASS, VAL_PER_CLASS = 6, 2


def data_cli(*args):
    return subprocess.run([sys.executable, "-m", "vgg.data", *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=300, cwd=ROOT)


def pick(sample_root: Path):
    """A few readable images per class: {wnid: [train paths]}, [(val path, wnid)] with val names
    renumbered ILSVRC2012_val_00000001.JPEG ... in an order that mixes the classes."""
    train = {w: sorted(p for p in (sample_root / "train" / w).iterdir() if "awkward" not in p.name)[:TRAIN_PER_CLASS]
             for w in CLASSES}
    val = [(p, w) for k in range(VAL_PER_CLASS) for w in reversed(CLASSES)
           for p in [sorted(q for q in (sample_root / "val" / w).iterdir() if "awkward" not in q.name)[k]]]
    return train, [(p, w, f"ILSVRC2012_val_{i:08d}.JPEG") for i, (p, w) in enumerate(val, start=1)]


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_kaggle(sample_root: Path, src: Path) -> None:
    train, val = pick(sample_root)
    loc = src / "ILSVRC" / "Data" / "CLS-LOC"
    for wnid, paths in train.items():
        (loc / "train" / wnid).mkdir(parents=True)
        for p in paths:
            (loc / "train" / wnid / p.name).write_bytes(p.read_bytes())
    (loc / "val").mkdir(parents=True)
    rows = ["ImageId,PredictionString"]
    for path, wnid, name in val:
        (loc / "val" / name).write_bytes(path.read_bytes())
        other = CLASSES[0] if wnid != CLASSES[0] else CLASSES[1]  # a second box of another class: not the label
        rows.append(f"{name[:-5]},{wnid} 10 12 40 44 {other} 1 2 3 4 ")
    (src / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    (src / "LOC_synset_mapping.txt").write_text("".join(f"{w} some class\n" for w in CLASSES))


def make_hf(sample_root: Path, src: Path) -> None:
    train, val = pick(sample_root)
    (src / "data").mkdir(parents=True)
    items = [(p, w) for w, paths in train.items() for p in paths]
    for part in range(2):  # two train tarballs, classes spread over both
        with tarfile.open(src / "data" / f"train_images_{part}.tar.gz", "w:gz") as tar:
            for p, w in items[part::2]:
                add_bytes(tar, f"{p.stem}_{w}.JPEG", p.read_bytes())
    with tarfile.open(src / "data" / "val_images.tar.gz", "w:gz") as tar:
        for path, wnid, name in val:
            add_bytes(tar, f"{name[:-5]}_{wnid}.JPEG", path.read_bytes())
    with tarfile.open(src / "data" / "test_images.tar.gz", "w:gz") as tar:  # no labels: left out
        add_bytes(tar, "ILSVRC2012_test_00000001.JPEG", val[0][0].read_bytes())


def make_devkit(sample_root: Path, src: Path) -> None:
    """The three archives of image-net.org's release. The devkit's IDs list the classes in another
    order than sorted (as WordNet's hierarchy does), so a reader that took IDs as indices would fail."""
    import scipy.io

    train, val = pick(sample_root)
    src.mkdir(parents=True)
    id_order = [CLASSES[i] for i in (2, 0, 3, 1)]  # ILSVRC2012_ID 1 = id_order[0]
    with tarfile.open(src / "ILSVRC2012_img_train.tar", "w") as outer:
        for wnid, paths in train.items():
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for p in paths:
                    add_bytes(tar, p.name, p.read_bytes())
            add_bytes(outer, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(src / "ILSVRC2012_img_val.tar", "w") as tar:
        for path, _, name in val:
            add_bytes(tar, name, path.read_bytes())
    synsets = np.zeros(len(id_order) + 1, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for i, wnid in enumerate(id_order):
        synsets[i] = (i + 1, wnid, 0)
    synsets[-1] = (len(id_order) + 1, "n99999999", 4)  # an inner node of the hierarchy: not a class
    mat = io.BytesIO()
    scipy.io.savemat(mat, {"synsets": synsets})
    truth = "".join(f"{id_order.index(wnid) + 1}\n" for _, wnid, _ in val)
    with tarfile.open(src / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        add_bytes(tar, "ILSVRC2012_devkit_t12/data/meta.mat", mat.getvalue())
        add_bytes(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth.encode())


MAKERS = {"kaggle": make_kaggle, "hf": make_hf, "devkit": make_devkit}


def assert_layout(sample_root: Path, dest: Path) -> None:
    """DEST holds every picked image under its true class, byte for byte, and nothing else."""
    train, val = pick(sample_root)
    assert sorted(os.listdir(dest / "train")) == CLASSES and sorted(os.listdir(dest / "val")) == CLASSES
    for wnid, paths in train.items():
        assert sorted(os.listdir(dest / "train" / wnid)) == sorted(p.name for p in paths)
        for p in paths:
            assert (dest / "train" / wnid / p.name).read_bytes() == p.read_bytes()
    for wnid in CLASSES:
        assert sorted(os.listdir(dest / "val" / wnid)) == sorted(name for _, w, name in val if w == wnid)
    for path, wnid, name in val:
        assert (dest / "val" / wnid / name).read_bytes() == path.read_bytes()


def snapshot(dest: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in dest.rglob("*")}


@pytest.fixture(scope="module")
def prepared(sample_root, tmp_path_factory) -> dict:
    """Each source faked, prepared with the CLI, then prepared again (in-process, through the same
    main()): {source: (dest, first run, second run's stdout, files before and after the second run)}."""
    from vgg.data.__main__ import main

    out = {}
    for source, make in MAKERS.items():
        base = tmp_path_factory.mktemp(source)
        src, dest = base / "src", base / "imagenet"
        make(sample_root, src)
        first = data_cli("prepare", "--from", source, src, dest)
        before = snapshot(dest)
        second = io.StringIO()
        with contextlib.redirect_stdout(second):
            code = main(["prepare", "--from", source, str(src), str(dest)])
        out[source] = (dest, src, first, (code, second.getvalue()), before, snapshot(dest))
    return out


@pytest.mark.parametrize("source", ["kaggle", "hf", "devkit"])
def test_prepare_each_source_then_rerun_does_nothing(sample_root, prepared, source):
    dest, src, first, (code, second), before, after = prepared[source]
    assert first.returncode == 0, first.stderr
    n_train, n_val = len(CLASSES) * TRAIN_PER_CLASS, len(CLASSES) * VAL_PER_CLASS
    assert f"{len(CLASSES)} classes, {n_train} train and {n_val} val images" in first.stdout
    assert_layout(sample_root, dest)
    if source == "kaggle":  # files on disk: hard links (same file system), not copies
        assert f"{n_train + n_val} linked" in first.stdout, first.stdout
        assert next((dest / "train" / CLASSES[0]).iterdir()).stat().st_nlink == 2
    else:
        assert f"{n_train + n_val} extracted" in first.stdout, first.stdout
    assert code == 0 and "extracted" not in second and "linked" not in second, second
    assert after == before  # nothing written again


def test_prepared_folders_train_and_evaluate_through_the_clis(prepared, tmp_path):
    """Train on Kaggle's prepared folder; evaluate that net on the devkit's and Hugging Face's."""
    result = train_cli("--config", "demo", "--data", str(prepared["kaggle"][0]), "--out-dir", str(tmp_path / "ck"),
                       "--log-dir", str(tmp_path / "runs"), "--workers", "0", "--device", "cpu", "--epochs", "1",
                       "--batch-size", "8", "--stats-images", "8", "--run-name", "kaggle")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "ck" / "kaggle" / "metrics.jsonl").open()]
    assert rows[0]["val_images"] == len(CLASSES) * VAL_PER_CLASS
    for source in ("devkit", "hf"):
        evaluated = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--checkpoint",
                                    str(tmp_path / "ck" / "kaggle" / "best.pt"), "--data", str(prepared[source][0]),
                                    "--workers", "0", "--device", "cpu", "--dense", "--out", str(tmp_path / source)],
                                   capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=ROOT)
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        assert json.loads((tmp_path / f"{source}.json").read_text())["images"] == len(CLASSES) * VAL_PER_CLASS


def test_sort_val_reads_the_kaggle_csv(sample_root, tmp_path):
    from vgg.data.datasets.labels import sort_val

    make_kaggle(sample_root, tmp_path / "src")
    val = tmp_path / "src" / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    counts = sort_val(val, tmp_path / "src" / "LOC_val_solution.csv")
    assert counts["moved"] == len(CLASSES) * VAL_PER_CLASS and counts["classes"] == len(CLASSES)
    for _, wnid, name in pick(sample_root)[1]:
        assert (val / wnid / name).is_file()


def test_bad_sources_give_one_line(sample_root, tmp_path):
    from vgg.core.errors import UserError
    from vgg.data.datasets.prepare import prepare

    src = tmp_path / "src"
    make_kaggle(sample_root, src)
    (src / "LOC_val_solution.csv").rename(tmp_path / "solution.csv")
    assert_one_line_error(data_cli("prepare", "--from", "kaggle", src, tmp_path / "a"), "LOC_val_solution.csv",
                          "not found")
    rows = (tmp_path / "solution.csv").read_text().replace(f",{CLASSES[1]} ", ",n12345678 ", 1)
    (src / "LOC_val_solution.csv").write_text(rows)
    with pytest.raises(UserError, match="n12345678") as error:
        prepare("kaggle", src, tmp_path / "b")
    assert "not among the 4 training classes" in str(error.value)
    (src / "LOC_val_solution.csv").write_text((tmp_path / "solution.csv").read_text())
    loc_train = src / "ILSVRC" / "Data" / "CLS-LOC" / "train"
    (loc_train / "stray.JPEG").write_bytes(b"")
    with pytest.raises(UserError, match="mixes class folders .4. and loose images"):
        prepare("kaggle", src, tmp_path / "c")
    (loc_train / "stray.JPEG").unlink()
    (loc_train / "tench").mkdir()
    with pytest.raises(UserError, match="unknown wnid 'tench'"):
        prepare("kaggle", src, tmp_path / "d")
    with pytest.raises(UserError, match=r"no train_images_\*.tar.gz"):
        prepare("hf", src, tmp_path / "e")
    with pytest.raises(UserError, match="devkit"):
        prepare("devkit", src, tmp_path / "f")
    assert not any((tmp_path / name).exists() and any((tmp_path / name).rglob("*.JPEG")) for name in "abcdef")


def test_1000_classes_must_start_with_tench():
    from vgg.core.errors import UserError
    from vgg.data.datasets.prepare import check_class_order

    standard = ["n01440764"] + [f"n{2000000 + i:08d}" for i in range(999)]
    check_class_order(standard, "ok")
    with pytest.raises(UserError, match="index 0 is n01443537, not n01440764"):
        check_class_order(["n01443537"] + standard[1:], "shifted")
    with pytest.raises(UserError, match="sorted"):
        check_class_order(standard[::-1], "devkit order")


def test_1000_folder_classes_not_starting_with_tench_warn():
    from vgg.data.datasets.prepare import check_class_order

    numbered = [f"{i:03d}" for i in range(1000)]  # class folders named by number, not wnid
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # on the "vgg" logger itself: setup_logging stops it propagating
    logging.getLogger("vgg").addHandler(handler)
    try:
        check_class_order(numbered, "train", warn=True)
    finally:
        logging.getLogger("vgg").removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "warning: train: 1000 classes whose index 0 is 000, not n01440764 (tench) as in ILSVRC-2012's sorted wnids: "
        "these are not the standard classes or not named by wnid"]


def test_devkit_unpacked_and_copies(sample_root, tmp_path):
    """The devkit's release unpacked (per-class tars in train/, a flat val/, the devkit folder); and
    Kaggle's files copied, not linked, with --copy."""
    from vgg.data.datasets.prepare import prepare

    archives, src = tmp_path / "archives", tmp_path / "src"
    make_devkit(sample_root, archives)
    src.mkdir()
    with tarfile.open(archives / "ILSVRC2012_img_train.tar") as tar:
        tar.extractall(src / "train", filter="data")  # n00000000.tar, ... as the release's train tar holds
    with tarfile.open(archives / "ILSVRC2012_img_val.tar") as tar:
        tar.extractall(src / "val", filter="data")
    with tarfile.open(archives / "ILSVRC2012_devkit_t12.tar.gz") as tar:
        tar.extractall(src, filter="data")
    counts = prepare("devkit", src, tmp_path / "imagenet")
    assert_layout(sample_root, tmp_path / "imagenet")
    assert (counts["extracted"], counts["linked"]) == (len(CLASSES) * TRAIN_PER_CLASS, len(CLASSES) * VAL_PER_CLASS)

    make_kaggle(sample_root, tmp_path / "kaggle")
    counts = prepare("kaggle", tmp_path / "kaggle", tmp_path / "copied", copy=True)
    assert counts["copied"] == len(CLASSES) * (TRAIN_PER_CLASS + VAL_PER_CLASS) and "linked" not in counts
    assert next((tmp_path / "copied" / "train" / CLASSES[0]).iterdir()).stat().st_nlink == 1


def test_a_flat_val_folder_is_checked_before_anything_is_linked(tmp_path):
    """Kaggle's and the devkit's val/ are flat: class folders there, or a labelled image missing, is one line."""
    from vgg.core.errors import UserError
    from vgg.data.datasets.prepare import flat_val_files

    val = tmp_path / "val"
    (val / "n01440764").mkdir(parents=True)
    with pytest.raises(UserError, match=r"holds class folders: Kaggle's val/ is flat \(already sorted\?"):
        flat_val_files(val, {}, "LOC_val_solution.csv", "Kaggle's")
    (val / "n01440764").rmdir()
    (val / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    labels = {"ILSVRC2012_val_00000001.JPEG": "n01440764", "ILSVRC2012_val_00000002.JPEG": "n01443537"}
    with pytest.raises(UserError, match=r"^1 images named in truth.txt are not in .*val \(first: ILSVRC2012_val_00000002"):
        flat_val_files(val, labels, "truth.txt", "the release's")
    del labels["ILSVRC2012_val_00000002.JPEG"]
    assert flat_val_files(val, labels, "truth.txt", "the release's") == {
        "ILSVRC2012_val_00000001.JPEG": val / "ILSVRC2012_val_00000001.JPEG"}
