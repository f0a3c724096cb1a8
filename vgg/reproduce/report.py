"""The report: our top-1/top-5 errors beside the paper's for every row of Tables 3-6, the difference,
and each run's training curves as PNG plots (matplotlib).
"""

import json
import time
from pathlib import Path

from vgg.reproduce.plan import (
    EVAL_STAGES,
    PAPER_ROWS,
    TABLE_TITLES,
    TRAIN_STAGES,
    PaperRow,
    Settings,
    eval_status,
    scale_rule_text,
    train_status,
)

# --- The report --------------------------------------------------------------------------------------


def load_result(settings: Settings, source: str) -> dict | None:
    """An evaluation stage's results (evaluate.py's JSON), or None when it has not run."""
    try:
        return json.loads(settings.eval_out(source).with_suffix(".json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def our_row(result: dict, row: PaperRow, settings: Settings) -> dict | None:
    """The result row for a paper row: the net's checkpoint (or the fusion, which has none) and the method."""
    checkpoint = str(settings.best(row.net)) if len(row.nets) == 1 else ""
    found = [r for r in result["rows"] if r["checkpoint"] == checkpoint and r["method"] == row.method]
    return found[0] if found else None


def collect_rows(settings: Settings) -> list[dict]:
    """Every row of Tables 3-6: the paper's errors, ours (None where not evaluated yet) and the differences."""
    rows = []
    for row in PAPER_ROWS:
        result = load_result(settings, row.source)
        ours = our_row(result, row, settings) if result else None
        our_nets = [n for n in (result or {}).get("nets", []) if Path(n["checkpoint"]).parent.name in row.nets]
        entry = {"table": row.table, "net": row.net, "train_s": row.train_s, "test_q": row.test_q,
                 "method": row.method, "paper_top1_err": row.top1, "paper_top5_err": row.top5,
                 "top1_err": None, "top5_err": None, "diff_top1": None, "diff_top5": None,
                 "our_train_s": our_nets[0]["train_s"] if our_nets else None,
                 "our_test_q": ",".join(map(str, our_nets[0]["test_q"])) if our_nets else None,
                 "images": result["images"] if result else None, "source": row.source}
        if ours is not None:
            entry.update(top1_err=ours["top1_err"], top5_err=ours["top5_err"],
                         diff_top1=ours["top1_err"] - row.top1, diff_top5=ours["top5_err"] - row.top5)
        rows.append(entry)
    return rows


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's rows, one per epoch (the last row of an epoch if a resume repeated one)."""
    by_epoch = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_epoch[row["epoch"]] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def plot_curves(stage: str, metrics: list[dict], path: Path) -> None:
    """Val top-1/top-5 error and train loss per epoch of one run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in metrics]  # numbered as the logs and metrics.jsonl number them, from 0
    fig, (err_ax, loss_ax) = plt.subplots(1, 2, figsize=(9, 3.2))
    err_ax.plot(epochs, [m["val_top1_err"] for m in metrics], "o-", label="val top-1 error")
    err_ax.plot(epochs, [m["val_top5_err"] for m in metrics], "s-", label="val top-5 error")
    err_ax.set(xlabel="epoch (from 0)", ylabel="error (%)", title=f"{stage}: validation")
    err_ax.legend()
    loss_ax.plot(epochs, [m["train_loss"] for m in metrics], "o-", color="tab:red")
    loss_ax.set(xlabel="epoch (from 0)", ylabel="loss", title=f"{stage}: training loss")
    for ax in (err_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _number(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "-" if sign else "not run"
    return f"{value:+.2f}" if sign else f"{value:.2f}"


def _with_ours(paper: str, ours: str | None) -> str:
    """'256', or '256 → 37' where our run used other sizes (the demo)."""
    return paper if ours in (None, paper) else f"{paper} → {ours}"


def format_report(report: dict) -> str:
    lines = ["# The paper's Tables 3-6, reproduced", "",
             f"Written by `python reproduce.py` on {report['generated']}. Scale: **{report['scale']}** - "
             f"{report['scale_rule']}", "",
             f"Our numbers: top-1 / top-5 error (%) on `{report['data']}/val` ({report['val_images']} images "
             "read); the paper's: ILSVRC-2012 val "
             "(50,000 images). Δ = ours - paper (positive: worse than the paper). Where two sizes are given "
             "(paper → ours) our run used the second.", ""]
    if report["scale"] == "demo":
        n = report["classes"]
        chance = f" (chance: {100 * (1 - 1 / n):.1f}% top-1, {100 * max(0, 1 - 5 / n):.1f}% top-5 error for {n} " \
                 "classes)" if n else ""
        lines += ["The demo's nets are tiny and its data small: its numbers show that every stage and evaluation "
                  f"runs, not the paper's accuracy{chance}.", ""]
    for table, title in TABLE_TITLES.items():
        lines += [f"## {title}", "",
                  "| net (run) | train S | test Q | method | top-1 ours | top-1 paper | Δ top-1 | top-5 ours "
                  "| top-5 paper | Δ top-5 |",
                  "|---|---|---|---|--:|--:|--:|--:|--:|--:|"]
        for r in (r for r in report["rows"] if r["table"] == table):
            lines.append(f"| {r['net']} | {_with_ours(r['train_s'], r['our_train_s'])} | "
                         f"{_with_ours(r['test_q'], r['our_test_q'])} | {r['method']} | {_number(r['top1_err'])} | "
                         f"{r['paper_top1_err']:.1f} | {_number(r['diff_top1'], True)} | {_number(r['top5_err'])} | "
                         f"{r['paper_top5_err']:.1f} | {_number(r['diff_top5'], True)} |")
        lines.append("")
    lines += ["## Training curves", "",
              "Per run, from its `metrics.jsonl`: validation top-1 and top-5 error after each epoch (one centre "
              "crop at Q = S, or the middle of the jitter range) and the mean training loss.", ""]
    for stage in TRAIN_STAGES:
        curve = report["curves"].get(stage.name)
        lines += [f"### {stage.name}", "", f"![{stage.name}]({curve})" if curve else "not trained yet", ""]
    lines += ["## Stages", "", "| stage | status |", "|---|---|"]
    words = {"done": "complete", "resume": "interrupted (resumed by the next run)", "run": "not run yet"}
    lines += [f"| {s['name']} | {words[s['status']]} |" for s in report["stages"]]
    lines += ["", f"Numbers depend on the machine: {report['device_note']}", ""]
    return "\n".join(lines)


def write_report(settings: Settings) -> tuple[Path, Path]:
    """report.md and report.json in --out-dir, the training curves under <out-dir>/curves/."""
    import torch

    curves = {}
    for stage in TRAIN_STAGES:
        metrics_path = settings.run_dir(stage.name) / "metrics.jsonl"
        metrics = read_metrics(metrics_path) if metrics_path.is_file() else []
        if metrics:
            png = settings.out_dir / "curves" / f"{stage.name}.png"
            if not png.is_file() or png.stat().st_mtime < metrics_path.stat().st_mtime:
                plot_curves(stage.name, metrics, png)
            curves[stage.name] = f"curves/{stage.name}.png"
    device = settings.runtime_value("device")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = collect_rows(settings)
    any_result = next(filter(None, (load_result(settings, s.name) for s in EVAL_STAGES)), None)
    statuses = [{"name": s.name, "status": train_status(s, settings)} for s in TRAIN_STAGES]
    statuses += [{"name": s.name, "status": eval_status(s, settings)} for s in EVAL_STAGES]
    report = {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "scale": settings.scale,
        "scale_rule": scale_rule_text(settings.scale), "data": settings.data, "out_dir": str(settings.out_dir),
        "rows": rows, "val_images": any_result["images"] if any_result else None,
        "classes": len(any_result["classes"]) if any_result else None,
        "curves": curves, "stages": statuses,
        "device_note": (f"device {device}, {settings.gpus} process(es), "
                        f"{torch.get_num_threads()} CPU threads in this process; another thread count or "
                        "GPU changes the order of float sums and so the last digits, and over a training "
                        "run possibly more."),
    }
    md_path, json_path = settings.out_dir / "report.md", settings.out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(format_report(report))
    return md_path, json_path
