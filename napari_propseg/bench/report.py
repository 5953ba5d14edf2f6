"""Benchmark reports: JSON, markdown tables, figures and the machine line
(:func:`write_k_slice_report`, :func:`write_report`, :func:`machine_description`).

Part of :mod:`napari_propseg.bench`; also importable from :mod:`napari_propseg.bench.protocol`.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np


# --------------------------------------------------------------------------- reports


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write JSON atomically (non-finite floats as ``Infinity``/``NaN``, as Python does)."""
    from ..atomic import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(obj, indent=1, default=_json_default) + "\n", what="benchmark JSON")


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{nd}f}"
    return str(v)


def k_slice_markdown(results: Sequence[Mapping[str, Any]], machine: str = "") -> str:
    """Markdown tables: a summary (mean Dice, |R|, |R|/Z, seconds, peak MB per method and
    k) and per-label Dice, for every case."""
    lines: list[str] = ["# k-slice propagation benchmark (PROTOCOL.md section 1)", ""]
    if machine:
        lines += [f"Machine: {machine}", ""]
    summary = mean_over_cases(results)
    if len(results) > 1 and summary:
        methods = list(dict.fromkeys(m for per_k in summary.values() for m in per_k))
        lines += [f"## Mean over cases ({len(results)} cases; each case's mean Dice over its labels, then the mean over cases)", "",
                  "| k | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for k, per in sorted(summary.items()):
            lines.append(f"| {k} | " + " | ".join(f"{_fmt(per[m]['mean'])} (n={per[m]['n']})" if m in per else "-" for m in methods) + " |")
        lines += ["", "| case | " + " | ".join(f"k={k} {m}" for k in sorted(summary) for m in methods) + " |",
                  "|---|" + "---|" * (len(summary) * len(methods))]
        for res in results:
            by_k = {run["k"]: run["methods"] for run in res["runs"]}
            cells = []
            for k in sorted(summary):
                for m in methods:
                    r = by_k.get(k, {}).get(m, {})
                    cells.append(_fmt(r.get("mean_dice")) if "mean_dice" in r else "-")
            lines.append(f"| {res['case']} | " + " | ".join(cells) + " |")
        lines.append("")
    for res in results:
        lines += [f"## {res['case']}  (shape {tuple(res['shape'])}, spacing {tuple(round(s, 3) for s in res['spacing'])} mm)", ""]
        lines += ["| k | \\|R\\| | \\|R\\|/Z | method | mean Dice | seconds | peak MB | refs unchanged |",
                  "|---|---|---|---|---|---|---|---|"]
        skipped: dict[str, str] = {}
        for run in res["runs"]:
            for m, r in run["methods"].items():
                if "skipped" in r:
                    skipped.setdefault(m, r["skipped"])
                else:
                    lines.append(f"| {run['k']} | {run['n_ref']} | {run['ref_fraction']:.3f} | {m} | {_fmt(r['mean_dice'])} | "
                                 f"{_fmt(r['seconds'], 2)} | {_fmt(r['peak_mb'], 0)} | {'yes' if r['anchors_unchanged'] else 'NO'} |")
        lines.append("")
        for m, why in skipped.items():
            lines += [f"Skipped {m}: {why}", ""]
        labs = sorted(int(i) for i in res["labels"])
        names = [res["labels"][i] if i in res["labels"] else res["labels"].get(str(i), str(i)) for i in labs]
        lines += ["Per-label Dice (slices not in R):", "",
                  "| k | method | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(labs)]
        for run in res["runs"]:
            for m, r in run["methods"].items():
                if "skipped" in r:
                    continue
                pl = {int(a): b for a, b in r["per_label"].items()}
                scored = set(int(x) for x in r["labels_scored"])
                cells = [_fmt(pl.get(i)) if i in scored else "-" for i in labs]
                lines.append(f"| {run['k']} | {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def mean_over_cases(results: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, dict[str, float]]]:
    """``{k: {method: {"mean": mean over cases of the case's mean Dice, "n": cases}}}``
    (PROTOCOL.md section 4: per case first, then over cases; skipped runs left out)."""
    acc: dict[int, dict[str, list[float]]] = {}
    for res in results:
        for run in res["runs"]:
            for m, r in run["methods"].items():
                if "mean_dice" in r and r["mean_dice"] is not None and not (isinstance(r["mean_dice"], float) and math.isnan(r["mean_dice"])):
                    acc.setdefault(int(run["k"]), {}).setdefault(m, []).append(float(r["mean_dice"]))
    return {k: {m: {"mean": float(np.mean(v)), "n": len(v)} for m, v in per.items()} for k, per in acc.items()}


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Lay out a matplotlib ``Figure`` and write it atomically to ``path`` (parents created)."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


def write_report(results: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, *, section: str, machine: str,
                 stem: str, plot: Callable[[Sequence[Mapping[str, Any]], Path], Path],
                 markdown: Callable[[Sequence[Mapping[str, Any]], str], str], extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write a benchmark's ``<stem>.json``, ``<stem>.png`` and ``<stem>.md`` into ``out_dir``.

    Args:
        results: one result dict per case.
        out_dir: folder (created).
        section: the protocol section, recorded in the JSON.
        machine: machine description, recorded in the JSON and the markdown.
        stem: file name stem.
        plot: ``(results, png_path) -> png_path``.
        markdown: ``(results, machine) -> markdown text``.
        extra: more top-level JSON entries (e.g. the mean over cases).

    Returns:
        ``{"json": path, "png": path, "md": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"protocol": section, "machine": machine,
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **dict(extra or {}), "cases": list(results)}
    paths = {"json": write_json(payload, out / f"{stem}.json"), "png": plot(results, out / f"{stem}.png")}
    md = out / f"{stem}.md"
    md.write_text(markdown(results, machine) + "\n", encoding="utf-8")
    paths["md"] = md
    return paths


def plot_k_slice(results: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """PNG: mean Dice against k, one line per method, one panel per case (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    n = max(1, len(results))
    fig = Figure(figsize=(4.5 * n, 3.8), dpi=110)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, res in zip(axes, results):
        methods = res["methods"]
        for m in methods:
            ks, ds = [], []
            for run in res["runs"]:
                r = run["methods"].get(m, {})
                if "mean_dice" in r:
                    ks.append(run["k"])
                    ds.append(r["mean_dice"])
            if ks:
                ax.plot(ks, ds, marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks([run["k"] for run in res["runs"]], [str(run["k"]) for run in res["runs"]])
        ax.set_xlabel("k (evenly spaced reference slices)")
        ax.set_ylabel("mean Dice (non-reference slices)")
        ax.set_title(res["case"], fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_k_slice_report(results: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, *,
                         machine: str = "", stem: str = "k_slice") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.png`` and ``<stem>.md`` into ``out_dir``.

    Returns:
        ``{"json": path, "png": path, "md": path}``.
    """
    summary = {str(k): v for k, v in sorted(mean_over_cases(results).items())}
    return write_report(results, out_dir, section="PROTOCOL.md section 1", machine=machine, stem=stem,
                        plot=plot_k_slice, markdown=k_slice_markdown, extra={"mean_over_cases": summary})


def machine_description() -> str:
    """One line naming the CPU, core count and torch threads (and the GPU if any)."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} logical cores"
    try:
        import torch

        desc += f", torch {torch.__version__} with {torch.get_num_threads()} threads"
        if torch.cuda.is_available():
            desc += f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:  # pragma: no cover
        pass
    return desc
