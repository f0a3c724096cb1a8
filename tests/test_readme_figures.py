"""The README's quoted figures (tools/readme_figures.py): each equals docs/readme_figures.json, and a fresh
run of the demo, its evaluation and the LeNet-5 demo still gives the record's figures. Timings are
never compared: they come from the record only, quoted with its date and machine."""

import copy
import json

import pytest

from tools import readme_figures as figures


def recorded() -> dict:
    return json.loads(figures.RECORD.read_text())


def test_the_readme_quotes_the_record():
    text, record = figures.README.read_text(), recorded()
    spans = figures.readme_spans(text)
    for name, render in figures.RENDERERS.items():
        assert spans[name] == render(record), f"README span {name!r} differs: run tools/readme_figures.py"
    assert f"{record['demo']['best_val_top1_err']:.1f} % at epoch {record['demo']['best_epoch']}" in spans["demo"]
    assert record["evaluation"]["table"][2].strip() in spans["eval-table"]


def test_a_stale_figure_is_rewritten_and_a_lost_marker_refused():
    text, record = figures.README.read_text(), recorded()
    demo = f"{record['demo']['best_val_top1_err']:.1f} %"
    stale = text.replace(demo, "99.9 %", 1)
    assert stale != text
    assert figures.rewrite(stale, record) == text
    with pytest.raises(figures.FiguresError, match="lenet5"):
        figures.readme_spans(text.replace("<!-- figures:lenet5 -->", "", 1))


def test_the_comparison_allows_one_image_and_no_more():
    record = recorded()
    assert figures.compare(record, copy.deepcopy(record)) == []
    one_image = 100 / record["evaluation"]["images"]
    fresh = copy.deepcopy(record)
    fresh["evaluation"]["rows"][0]["top1_err"] += one_image
    assert figures.compare(record, fresh) == []
    fresh["evaluation"]["rows"][0]["top1_err"] += one_image
    assert [d.split(":")[0] for d in figures.compare(record, fresh)] == ["evaluation dense"]
    fresh = copy.deepcopy(record)
    caltech = fresh["transfer"]["runs"][0]  # transfer.py's mean over the splits: one test image's worth too
    caltech["rows"][0]["mean"] += 100 / caltech["test_images"]
    assert figures.compare(record, fresh) == []
    caltech["rows"][0]["mean"] += 100 / caltech["test_images"]
    assert [d.split(":")[0] for d in figures.compare(record, fresh)] == ["transfer caltech"]
    fresh = copy.deepcopy(record)
    fresh["demo"]["best_val_top1_err"] -= 2 * figures.one_image(record["demo"])
    assert [d.split(":")[0] for d in figures.compare(record, fresh)] == ["demo"]
    # another best epoch: accepted when the recorded one ties with it within one image, refused otherwise
    lenet5 = copy.deepcopy(record)["lenet5_demo"]
    best = lenet5["best_epoch"]
    other = next(e for e in range(lenet5["epochs"]) if e != best)
    lenet5["best_epoch"] = other
    lenet5["val_top1_err_by_epoch"][other] = lenet5["best_val_top1_err"]
    lenet5["val_top1_err_by_epoch"][best] += figures.one_image(lenet5)
    assert figures.compare(record, {**record, "lenet5_demo": lenet5}) == []
    lenet5["val_top1_err_by_epoch"][best] += figures.one_image(lenet5)
    assert [d.split(":")[0] for d in figures.compare(record, {**record, "lenet5_demo": lenet5})] == ["lenet5_demo"]


def test_a_fresh_run_gives_the_recorded_figures(sample_root, tmp_path):
    """The demo, `evaluate.py --dense --multi-crop` on it and the LeNet-5 demo, run as the record's commands
    (subprocesses, one torch thread): errors within one validation image, the same best epoch (or a tie)."""
    fresh = figures.measure(sample_root, tmp_path / "digits", tmp_path / "scratch")
    assert figures.compare(recorded(), fresh) == []
