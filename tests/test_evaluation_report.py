"""What evaluate.py prints and writes (vgg/evaluation/'s reporting), from a hand-made result:
the table in the layout of the paper's Tables 3-6, the best and worst classes, the Markdown and
JSON files, the default checkpoint, and the one-line errors of bad calls."""

import json
import os
from pathlib import Path

import pytest
import torch

from vgg.core.errors import UserError
from vgg.evaluation.methods import BOTH, DENSE, MULTI_CROP, fuse, topk_errors, train_scale_text
from vgg.evaluation.nets import EvalNet, default_checkpoint
from vgg.evaluation.report import (
    format_markdown,
    format_per_class,
    format_report,
    format_table,
    write_results,
    write_tensorboard,
)

RESULT = {
    "val_dir": "data/val", "images": 4, "skipped": 1, "world_size": 1, "methods": [DENSE, MULTI_CROP],
    "classes": ["n1", "n2", "n3", "n4", "n5"], "class_images": [2, 0, 1, 1, 2],
    "nets": [{"name": "D", "checkpoint": "checkpoints/D/best.pt", "train_s": "256", "test_q": [224, 256, 288]},
             {"name": "E", "checkpoint": "checkpoints/E/best.pt", "train_s": "[256;512]", "test_q": [256, 384, 512]}],
    "rows": [
        {"net": "D", "checkpoint": "checkpoints/D/best.pt", "train_s": "256", "test_q": "224,256,288",
         "method": DENSE, "top1_err": 24.8, "top5_err": 7.5, "images": 4,
         "per_class_top1_acc": [50.0, None, 100.0, 0.0, 50.0], "per_class_top5_acc": [100.0, None, 100.0, 100.0, 50.0]},
        {"net": "E", "checkpoint": "checkpoints/E/best.pt", "train_s": "[256;512]", "test_q": "256,384,512",
         "method": MULTI_CROP, "top1_err": 25.0, "top5_err": 7.25, "images": 4,
         "per_class_top1_acc": [0.0, None, 0.0, 0.0, 0.0], "per_class_top5_acc": [100.0, None, 100.0, 100.0, 50.0]},
        {"net": "fusion: D + E", "checkpoint": "", "train_s": "-", "test_q": "-", "method": BOTH,
         "top1_err": 23.7149, "top5_err": 6.8049, "images": 4,
         "per_class_top1_acc": [50.0, None, 100.0, 0.0, 50.0], "per_class_top5_acc": [100.0, None, 100.0, 100.0, 100.0]},
    ],
}

TABLE = """\
net            train S    test Q       method              top-1 err (%)  top-5 err (%)
-------------  ---------  -----------  ------------------  -------------  -------------
D              256        224,256,288  dense                       24.80           7.50
E              [256;512]  256,384,512  multi-crop                  25.00           7.25
fusion: D + E  -          -            multi-crop & dense          23.71           6.80"""

MARKDOWN_TABLE = """\
| net           | train S   | test Q      | method             | top-1 err (%) | top-5 err (%) |
|---------------|-----------|-------------|--------------------|--------------:|--------------:|
| D             | 256       | 224,256,288 | dense              |         24.80 |          7.50 |
| E             | [256;512] | 256,384,512 | multi-crop         |         25.00 |          7.25 |
| fusion: D + E | -         | -           | multi-crop & dense |         23.71 |          6.80 |"""

PER_CLASS = """\
per-class top-1 accuracy (fusion: D + E, multi-crop & dense):
  best:  n3 100.0%, n1 50.0%
  worst: n4 0.0%, n5 50.0%"""


def test_table_in_the_layout_of_the_papers_tables():
    assert format_table(RESULT["rows"]) == TABLE
    assert format_table(RESULT["rows"], markdown=True) == MARKDOWN_TABLE


def test_best_and_worst_classes_skip_classes_without_images():
    """Sorted by accuracy, ties by wnid; at most half the scored classes on each side."""
    assert format_per_class(RESULT, RESULT["rows"][-1]) == PER_CLASS
    assert format_per_class(RESULT, RESULT["rows"][0], count=1).splitlines()[1:] == ["  best:  n3 100.0%",
                                                                                     "  worst: n4 0.0%"]
    many = {"classes": [f"n{i:02d}" for i in range(14)]}
    row = {"net": "D", "method": DENSE, "per_class_top1_acc": [float(i) for i in range(14)]}
    lines = format_per_class(many, row).splitlines()  # 5 a side by default
    assert lines[1] == "  best:  n13 13.0%, n12 12.0%, n11 11.0%, n10 10.0%, n09 9.0%"
    assert lines[2] == "  worst: n00 0.0%, n01 1.0%, n02 2.0%, n03 3.0%, n04 4.0%"
    row["per_class_top1_acc"] = [float(i) for i in range(6)] + [None] * 8
    assert format_per_class(many, row).splitlines()[1] == "  best:  n05 5.0%, n04 4.0%, n03 3.0%"  # half of 6


def test_report_is_table_classes_and_counts():
    assert format_report(RESULT) == f"{TABLE}\n\n{PER_CLASS}\n\n4 images evaluated, 1 unreadable images skipped"


def test_markdown_and_json_files(tmp_path):
    assert format_markdown(RESULT) == (
        f"# Evaluation on `data/val`\n\n{MARKDOWN_TABLE}\n\n4 images evaluated, 1 unreadable images skipped.\n\n"
        "Nets:\n- D: `checkpoints/D/best.pt` (train S 256, test Q 224,256,288)\n"
        "- E: `checkpoints/E/best.pt` (train S [256;512], test Q 256,384,512)\n")
    for out in ("deep/eval/run1", "deep/eval/run1.json", "deep/eval/run1.md"):
        json_path, md_path = write_results(RESULT, tmp_path / out)
        assert (json_path, md_path) == (tmp_path / "deep/eval/run1.json", tmp_path / "deep/eval/run1.md")
        assert json.loads(json_path.read_text()) == RESULT
        assert json_path.read_text().startswith('{\n "val_dir"') and json_path.read_text().endswith("}\n")
        assert md_path.read_text() == format_markdown(RESULT)
    assert sorted(p.name for p in (tmp_path / "deep" / "eval").iterdir()) == ["run1.json", "run1.md"]


def test_default_checkpoint_is_the_newest_best_pt_under_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^no checkpoint found under checkpoints/\*/best.pt: train a net first "
                                        r"\(python train.py\) or pass --checkpoint PATH$"):
        default_checkpoint()
    for name, age in (("a", 100), ("b", 50), ("c", 200)):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "best.pt").write_bytes(b"x")
        os.utime(tmp_path / "checkpoints" / name / "best.pt", (1e9 - age, 1e9 - age))
    (tmp_path / "checkpoints" / "c" / "last.pt").write_bytes(b"x")  # only best.pt counts
    assert default_checkpoint() == Path("checkpoints/b/best.pt")
    assert default_checkpoint(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "b" / "best.pt"


def test_training_scale_as_the_tables_write_it():
    assert train_scale_text(256, 256) == "256" and train_scale_text(256, 512) == "[256;512]"


def test_scoring_one_image_and_nothing():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3, 0.0, 0.4]])
    assert topk_errors(scores, torch.tensor([3])) == {1: 0.0, 5: 0.0}
    assert topk_errors(scores, torch.tensor([2])) == {1: 100.0, 5: 0.0}
    with pytest.raises(UserError, match="^no images to score$"):
        topk_errors(scores[:0], torch.tensor([], dtype=torch.int64))
    with pytest.raises(UserError, match="^nothing to fuse$"):
        fuse([])


def tensorboard_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0, "histograms": 0})
    events.Reload()
    return events


def eval_net(path, config):
    return EvalNet(name="D", path=Path(path), model=None, classes=RESULT["classes"], mean_rgb=[0.0] * 3,
                   crop_size=224, scale_min=256, scale_max=256, scales=[224, 256, 288], config=config)


def test_tensorboard_section_beside_the_training_curves(tmp_path, monkeypatch):
    """The table as text and each row's per-class top-1 accuracy (classes with images only) as a
    histogram, in <log_dir>/<run_name>, under tags that keep several evaluations apart."""
    result = json.loads(json.dumps(RESULT))
    result["rows"].append({**result["rows"][0], "net": "(X) ", "method": DENSE})  # a label to tidy
    result["rows"].append({**result["rows"][0], "net": "empty", "per_class_top1_acc": [None] * 5})
    net = eval_net(tmp_path / "checkpoints" / "ckdir" / "best.pt",
                   {"log_dir": str(tmp_path / "logs"), "run_name": "run7"})
    folder = write_tensorboard(result, net, "q256")
    assert folder == tmp_path / "logs" / "run7"
    events = tensorboard_events(folder)
    (text,) = events.Tensors("evaluation/q256/table/text_summary")
    table = format_table(result["rows"], markdown=True)
    assert text.step == 0 and text.tensor_proto.string_val[0].decode() == (
        f"{table}\n\n4 images of `data/val` evaluated, 1 unreadable skipped; "
        "nets: D (`checkpoints/D/best.pt`), E (`checkpoints/E/best.pt`)")
    prefix = "evaluation/q256/per_class_top1_acc/"
    assert sorted(events.Tags()["histograms"]) == sorted(
        prefix + label for label in ("D_dense", "E_multi-crop", "fusion_D_+_E_multi-crop_&_dense", "X_dense"))
    for label, row in (("D_dense", 0), ("E_multi-crop", 1), ("fusion_D_+_E_multi-crop_&_dense", 2)):
        (event,) = events.Histograms(prefix + label)
        scored = [a for a in result["rows"][row]["per_class_top1_acc"] if a is not None]
        h = event.histogram_value
        assert event.step == 0
        assert (h.num, h.min, h.max, h.sum) == (len(scored), min(scored), max(scored), sum(scored))


def test_tensorboard_folder_defaults_to_runs_and_the_checkpoints_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for config, expected in (({}, "runs/ckdir"), ({"log_dir": "", "run_name": "r"}, "runs/r"),
                             ({"log_dir": None}, "runs/ckdir"), ({"log_dir": "tb"}, "tb/ckdir")):
        net = eval_net(tmp_path / "checkpoints" / "ckdir" / "best.pt", config)
        folder = write_tensorboard(RESULT, net, "e")
        assert folder == Path(expected)
        assert len(tensorboard_events(folder).Tags()["histograms"]) == 3
