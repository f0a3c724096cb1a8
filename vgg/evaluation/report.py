"""The results as people read them: the printed table (the layout of the paper's Tables 3-6), the best
and worst classes, Markdown and JSON files, TensorBoard.
"""

import json
import math
import re
from pathlib import Path

import torch

from vgg.evaluation.nets import EvalNet

# --- Reporting -----------------------------------------------------------------------------------

COLUMNS = ("net", "train S", "test Q", "method", "top-1 err (%)", "top-5 err (%)")


def _cells(row: dict) -> list[str]:
    return [row["net"], row["train_s"], row["test_q"], row["method"], f"{row['top1_err']:.2f}",
            f"{row['top5_err']:.2f}"]


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """The results in the layout of the paper's Tables 3-6, as aligned text or a Markdown table."""
    cells = [list(COLUMNS)] + [_cells(row) for row in rows]
    widths = [max(len(r[c]) for r in cells) for c in range(len(COLUMNS))]
    numeric = {4, 5}

    def line(r):
        parts = [cell.rjust(w) if c in numeric else cell.ljust(w) for c, (cell, w) in enumerate(zip(r, widths))]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts).rstrip()

    out = [line(cells[0])]
    if markdown:
        out.append("|" + "|".join("-" * (w + 1) + (":" if c in numeric else "-") for c, w in enumerate(widths)) + "|")
    else:
        out.append("  ".join("-" * w for w in widths))
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def format_per_class(result: dict, row: dict, count: int = 5) -> str:
    """The `count` best and worst classes by top-1 accuracy for one result row."""
    scored = [(acc, wnid) for wnid, acc in zip(result["classes"], row["per_class_top1_acc"]) if acc is not None]
    scored.sort(key=lambda t: (-t[0], t[1]))
    count = min(count, math.ceil(len(scored) / 2))

    def show(items):
        return ", ".join(f"{wnid} {acc:.1f}%" for acc, wnid in items)

    return (f"per-class top-1 accuracy ({row['net']}, {row['method']}):\n"
            f"  best:  {show(scored[:count])}\n  worst: {show(scored[::-1][:count])}")


def format_report(result: dict) -> str:
    """What evaluate.py prints: the table, the best/worst classes of the last row, the image counts."""
    lines = [format_table(result["rows"]), "", format_per_class(result, result["rows"][-1]), "",
             f"{result['images']} images evaluated, {result['skipped']} unreadable images skipped"]
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    """The Markdown file written next to the JSON: the table and the run's facts."""
    nets = "\n".join(f"- {n['name']}: `{n['checkpoint']}` (train S {n['train_s']}, test Q "
                     f"{','.join(map(str, n['test_q']))})" for n in result["nets"])
    return (f"# Evaluation on `{result['val_dir']}`\n\n{format_table(result['rows'], markdown=True)}\n\n"
            f"{result['images']} images evaluated, {result['skipped']} unreadable images skipped.\n\n"
            f"Nets:\n{nets}\n")


def write_results(result: dict, out) -> tuple[Path, Path]:
    """Write `<out>.json` (everything, per-class accuracy included) and `<out>.md` (the table)."""
    out = Path(out)
    if out.suffix in (".json", ".md"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out.parent / (out.name + ".json"), out.parent / (out.name + ".md")
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(format_markdown(result))
    return json_path, md_path


def write_tensorboard(result: dict, net: EvalNet, name: str) -> Path:
    """An "evaluation" section in the TensorBoard folder of the run that trained `net`
    (<log_dir>/<run_name> from its checkpoint's config), beside the training curves: the table as
    text (TEXT tab) and each row's per-class top-1 accuracy as a histogram (HISTOGRAMS tab), under
    tags `evaluation/<name>/...` so that several evaluations of a run stay apart. Returns the folder."""
    from torch.utils.tensorboard import SummaryWriter  # only evaluate.py needs it

    folder = Path(net.config.get("log_dir") or "runs") / net.config.get("run_name", net.path.parent.name)
    with SummaryWriter(str(folder)) as writer:
        nets = ", ".join(f"{n['name']} (`{n['checkpoint']}`)" for n in result["nets"])
        writer.add_text(f"evaluation/{name}/table",
                        f"{format_table(result['rows'], markdown=True)}\n\n{result['images']} images of "
                        f"`{result['val_dir']}` evaluated, {result['skipped']} unreadable skipped; nets: {nets}", 0)
        for row in result["rows"]:
            accuracy = [a for a in row["per_class_top1_acc"] if a is not None]
            if accuracy:
                label = re.sub(r"[^\w.&+-]+", "_", f"{row['net']} {row['method']}").strip("_")
                writer.add_histogram(f"evaluation/{name}/per_class_top1_acc/{label}", torch.tensor(accuracy), 0)
    return folder
