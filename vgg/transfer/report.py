"""The results beside the paper's Table 11: the printed table, its text, JSON and Markdown files in the run
folder, per-class AP or recall, and TensorBoard text.
"""

import json
from pathlib import Path

import numpy as np

# Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR 2015
# (arXiv:1409.1556v6), Appendix B, Table 11: VOC mean AP (%) on the test sets, Caltech mean class recall (%)
# (mean ± std over 3 random splits). Read from the paper's text of v6.
PAPER_SOURCE = "Simonyan & Zisserman, ICLR 2015 (arXiv:1409.1556v6), Appendix B, Table 11"
PAPER_TABLE_11 = {
    ("D",): {"voc2007": (89.3, None), "voc2012": (89.0, None), "caltech101": (91.8, 1.0), "caltech256": (85.0, 0.2)},
    ("E",): {"voc2007": (89.3, None), "voc2012": (89.0, None), "caltech101": (92.3, 0.5), "caltech256": (85.1, 0.3)},
    ("D", "E"): {"voc2007": (89.7, None), "voc2012": (89.3, None), "caltech101": (92.7, 0.5),
                 "caltech256": (86.2, 0.3)},
}
DATASET_NAMES = {"voc2007": "VOC-2007", "voc2012": "VOC-2012", "caltech101": "Caltech-101",
                 "caltech256": "Caltech-256"}
COLUMNS = ("net", "test Q", "combine", "dims", "C", "dataset", "measure", "ours (%)", "paper (%)")
NUMERIC = {3, 7, 8}


def dataset_name(kind: str, root) -> str:
    return DATASET_NAMES.get(kind, f"VOC-{kind[3:]}" if kind.startswith("voc") else Path(root).name)


def measure_name(multilabel: bool) -> str:
    return "mAP" if multilabel else "mean class recall"


def paper_figure(archs: list[str], kind: str) -> str:
    """The paper's Table 11 figure for these nets on this dataset, or "-" where it has none."""
    figure = PAPER_TABLE_11.get(tuple(archs), {}).get(kind)
    if figure is None:
        return "-"
    value, std = figure
    return f"{value:.1f}" if std is None else f"{value:.1f} ± {std:.1f}"


def ours(row: dict) -> str:
    return f"{row['mean']:.1f}" if len(row["splits"]) == 1 else f"{row['mean']:.1f} ± {row['std']:.1f}"


def _cells(row: dict, result: dict) -> list[str]:
    cs = sorted({f"{s['C']:g}" for s in row["splits"]}, key=float)
    return [row["net"], row["test_q"], row["combine"], str(row["dims"]), ",".join(cs), result["dataset"],
            result["measure"], ours(row), paper_figure(row["archs"], result["kind"])]


def aligned(header, body: list[list[str]], numeric=frozenset(), markdown: bool = False) -> str:
    """Columns of text aligned (numbers to the right), as evaluate.py prints them, or a Markdown table."""
    cells = [list(header)] + body
    widths = [max(len(r[c]) for r in cells) for c in range(len(header))]

    def line(r):
        parts = [cell.rjust(w) if c in numeric else cell.ljust(w) for c, (cell, w) in enumerate(zip(r, widths))]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts).rstrip()

    rule = ("|" + "|".join("-" * (w + 1) + (":" if c in numeric else "-") for c, w in enumerate(widths)) + "|"
            if markdown else "  ".join("-" * w for w in widths))
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def format_table(result: dict, markdown: bool = False) -> str:
    return aligned(COLUMNS, [_cells(row, result) for row in result["rows"]], NUMERIC, markdown)


def format_per_class(result: dict, markdown: bool = False, limit: int | None = None) -> str:
    """Per-class AP or recall (mean over the splits) of every row; with `limit`, only the best and worst."""
    rows = result["rows"]
    body = [[cls] + ["-" if row["per_class"][k] is None else f"{row['per_class'][k]:.1f}" for row in rows]
            for k, cls in enumerate(result["classes"])]
    if limit is not None and len(body) > 2 * limit:
        order = np.argsort([-(rows[-1]["per_class"][k] or 0.0) for k in range(len(body))], kind="stable")
        body = [body[k] for k in order[:limit]] + [["..."] * len(body[0])] + [body[k] for k in order[-limit:]]
    header = [f"class ({'AP' if result['multilabel'] else 'recall'}, %)"] + [row["net"] for row in rows]
    return aligned(header, body, set(range(1, len(header))), markdown)


def format_report(result: dict) -> str:
    """What transfer.py prints: the table, the paper's source, the notes, per-class figures (best and worst)."""
    return "\n".join([format_table(result), "", f"paper: {PAPER_SOURCE}", *[f"note: {n}" for n in result["notes"]],
                      "", format_per_class(result, limit=5)])


def format_markdown(result: dict) -> str:
    notes = "".join(f"- {n}\n" for n in result["notes"])
    return (f"# Appendix B on `{result['data']}` ({result['dataset']})\n\n{format_table(result, markdown=True)}\n\n"
            f"Paper: {PAPER_SOURCE}.\n\n{notes}\n## Per class (mean over the splits)\n\n"
            f"{format_per_class(result, markdown=True)}\n")


def write_results(result: dict, out: Path) -> list[Path]:
    """results.txt, results.json (everything: per split, per class, the C chosen and its cross-validation),
    results.md in the run folder `out`."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"results.txt": format_report(result) + "\n", "results.json": json.dumps(result, indent=1) + "\n",
             "results.md": format_markdown(result)}
    for name, text in files.items():
        (out / name).write_text(text)
    return [out / name for name in files]


def write_tensorboard(result: dict, out: Path) -> Path:
    """The table and the per-class figures as TensorBoard text (TEXT tab) under <out>/tensorboard."""
    from torch.utils.tensorboard import SummaryWriter  # only the command line needs it

    folder = out / "tensorboard"
    with SummaryWriter(str(folder)) as writer:
        writer.add_text("transfer/table", f"{format_table(result, markdown=True)}\n\nPaper: {PAPER_SOURCE}", 0)
        writer.add_text("transfer/per_class", format_per_class(result, markdown=True), 0)
    return folder
