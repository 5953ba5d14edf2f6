"""Fully automatic segmentation over a dataset folder: ``propseg segment`` on every case.

For each labelled case the reference model suggests its slices and the propagation engine
fills the volume (exactly what ``propseg segment CT --model NAME`` does), then each organ
the case holds (its ``labels_present``) is scored by Dice over the whole volume; organs the
case does not hold are unknown there and not scored, even when predicted (PROTOCOL.md
section 4). Reported: per case and organ, the mean over a case's organs, then the mean
over cases, and each organ's mean over the cases that hold it.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Sequence

import numpy as np

from ..progress import check_cancel, report
from .protocol import dice_per_label

log = logging.getLogger(__name__)


def score_case(pred: np.ndarray, gt: np.ndarray, organs: Sequence[int]) -> dict[int, float]:
    """Dice of each organ over the whole volume (an organ absent from both scores 1.0)."""
    return dice_per_label(pred, gt, labels=list(organs))


def run_segment_dataset(cases, *, model: str | None = None, weights=None, k: int | None = None, method: str = "interp",
                        device: str = "cpu", progress=None, cancel=None, min_agreement: float | None = None,
                        largest_component: bool | None = None) -> dict[str, Any]:
    """Segment every case of an iterable of BenchCase (``bench.cases.iter_dataset_cases``).

    Returns:
        ``{"model", "k", "method", "cases": [{"case", "dice": {organ name: Dice}, "mean_dice",
        "seconds", "n_ref"}], "per_organ": {name: {"mean", "n"}}, "mean_dice", "n_cases"}``.
    """
    from ..cli.segment import segment

    out: dict[str, Any] = {"model": model, "k": k, "method": method, "min_agreement": min_agreement,
                           "largest_component": largest_component, "cases": []}
    for i, case in enumerate(cases):
        check_cancel(cancel)
        organs = sorted(case.label_names)
        t0 = time.perf_counter()
        labels, sug = segment(case.image_hu, weights=weights, k=k, method=method, device=device, spacing=case.spacing,
                              model=model, cancel=cancel, min_agreement=min_agreement,
                              largest_component=largest_component)
        seconds = time.perf_counter() - t0
        names = sug.label_map or {}
        # match classes by name: the model's id for each organ name of the dataset
        by_name = {str(v).lower(): int(kk) for kk, v in names.items()}
        pred = np.zeros_like(case.labels)
        for oid in organs:
            mid = by_name.get(str(case.label_names[oid]).lower())
            if mid is not None:
                pred[labels == mid] = oid
        dice = score_case(pred, case.labels, organs)
        row = {"case": case.name, "dice": {case.label_names[o]: float(d) for o, d in dice.items()},
               "mean_dice": float(np.mean(list(dice.values()))) if dice else float("nan"),
               "seconds": seconds, "n_ref": len(sug.slices)}
        out["cases"].append(row)
        log.info("segment %s: mean Dice %.3f over %d organs in %.1f s", case.name, row["mean_dice"], len(dice), seconds)
        report(progress, i + 1, i + 1, f"{case.name}: {row['mean_dice']:.3f}")
    out.update(summarise(out["cases"]))
    return out


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    per: dict[str, list[float]] = {}
    for r in rows:
        for name, d in r["dice"].items():
            per.setdefault(name, []).append(float(d))
    means = [r["mean_dice"] for r in rows if np.isfinite(r["mean_dice"])]
    return {"per_organ": {n: {"mean": float(np.mean(v)), "n": len(v)} for n, v in per.items()},
            "mean_dice": float(np.mean(means)) if means else float("nan"), "n_cases": len(rows)}


def segment_markdown(res: Mapping[str, Any], machine: str = "") -> str:
    lines = ["# Fully automatic segmentation (propseg segment) over a dataset", ""]
    k_text = res.get("k") or "the model's setting"
    if machine:
        lines += [f"Machine: {machine}", ""]
    lines += [f"Model `{res.get('model') or 'default'}`, k = {k_text}, propagation `{res.get('method')}`; "
              f"mean Dice over each case's present organs, then over {res['n_cases']} cases: **{res['mean_dice']:.3f}**", "",
              "| organ | mean Dice | cases |", "|---|---|---|"]
    for name, v in res["per_organ"].items():
        lines.append(f"| {name} | {v['mean']:.3f} | {v['n']} |")
    organs = list(res["per_organ"])
    lines += ["", "| case | mean | " + " | ".join(organs) + " | seconds |", "|---|---|" + "---|" * len(organs) + "---|"]
    for r in res["cases"]:
        cells = [f"{r['dice'][o]:.3f}" if o in r["dice"] else "-" for o in organs]
        lines.append(f"| {r['case']} | {r['mean_dice']:.3f} | " + " | ".join(cells) + f" | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"
