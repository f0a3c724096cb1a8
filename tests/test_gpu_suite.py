"""bench/gpu_suite.py --smoke as a real subprocess: every section reports figures or why it has none.

Nothing here depends on speed: only which sections ran, that their figures are numbers, and that
what was not measured says why.
"""

import json
import math
import subprocess
import sys

from conftest import ROOT, assert_one_line_error, subprocess_env

SUITE = str(ROOT / "bench" / "gpu_suite.py")
SECTIONS = ("machine", "step", "data", "decoder", "learning", "evaluation", "two_gpus", "versions")
REQUIRED = {"step": ("ours_img_s", "peer_compiled_img_s", "matmul_tflops"),
            "data": ("gpu_fed_over_step", "cpu_fed_over_step", "workers"),
            "evaluation": ("fraction_of_forward",), "learning": ("loss_first", "loss_last")}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_smoke_run_reports_every_section(tmp_path):
    bench_file = ROOT / "docs" / "benchmarks.md"
    before = bench_file.read_text()
    out = tmp_path / "suite.json"
    result = subprocess.run([sys.executable, SUITE, "--smoke", "--no-record", "--out", str(out),
                             "--work-dir", str(tmp_path / "work")],
                            capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["device"] == "cpu"
    for name in SECTIONS:
        section = report[name]
        assert name in result.stdout  # a row of the printed table
        if section["status"] != "ok":
            assert section["reason"].strip(), name
    # On the CPU exactly the CUDA-only sections are skipped, and for that reason; the rest ran.
    assert {n: report[n]["status"] for n in SECTIONS} == {**dict.fromkeys(SECTIONS, "ok"), "two_gpus": "skipped"}, \
        {n: report[n].get("reason") for n in SECTIONS}
    assert report["two_gpus"]["reason"] == "no CUDA"
    # The decoder section: each GPU decoder "not run: no GPU"; the GPU path's code on the CPU, each in a
    # process of its own, agrees with the CPU decode, and the CPU workers were timed.
    variants = report["decoder"]["variants"]
    assert {name: variants[name]["status"] for name in ("nvimgcodec-hw", "nvimgcodec-cuda", "nvimgcodec-both")} == \
        dict.fromkeys(("nvimgcodec-hw", "nvimgcodec-cuda", "nvimgcodec-both"), "not run: no GPU")
    for name in ("torchcodec", "nvimgcodec-cpu", "cpu-workers"):
        assert variants[name]["status"] == "ok" and _is_number(variants[name]["decode_augment_img_s"]), name
        assert _is_number(variants[name]["fed_over_step"]) and variants[name]["pixel_mean_diff"] <= 2.0, name

    for name, keys in REQUIRED.items():
        for key in keys:
            value = report[name][key]
            if value is None:
                assert report[name]["why_null"][key].strip(), (name, key)
            elif key == "workers":
                assert value and all(isinstance(n, int) and n >= 1 for n in value)
            else:
                assert _is_number(value), (name, key, value)
    # What the CPU can measure, it measured; the CUDA-only figures are null, saying so.
    for name, key in (("step", "ours_img_s"), ("step", "matmul_tflops"), ("data", "cpu_fed_over_step"),
                      ("evaluation", "fraction_of_forward"), ("learning", "loss_first")):
        assert _is_number(report[name][key]), (name, key)
    assert report["step"]["peer_compiled_img_s"] is None and report["step"]["why_null"]["peer_compiled_img_s"] == "no CUDA"
    assert report["data"]["gpu_fed_over_step"] is None and report["data"]["why_null"]["gpu_fed_over_step"] == "no CUDA"
    assert report["learning"]["loss_last"] <= 0.5 * report["learning"]["loss_first"]
    assert report["versions"]["torch"] and report["versions"]["torch_new_enough"] is True
    assert bench_file.read_text() == before  # --no-record


def test_unwritable_out_is_one_error_line(tmp_path):
    result = subprocess.run([sys.executable, SUITE, "--smoke", "--out", str(tmp_path / "missing" / "suite.json")],
                            capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=300)
    assert_one_line_error(result, "--out")
