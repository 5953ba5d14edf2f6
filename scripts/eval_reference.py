"""Score reference weights slice by slice on the shared real cases and an unseen phantom.

Every axial slice of each case goes through each network alone and through the summed
ensemble (what ``propseg suggest`` does on its k slices); Dice per FLARE organ is computed
over the whole volume (all slices), against the case's labels mapped to FLARE ids. Writes
a JSON and prints a Markdown table for the model card.

    .venv/bin/python scripts/eval_reference.py models/reference/transunet_small.pt \
        models/reference/deeplabv3plus_small.pt --data ../shared/data --out docs/bench/reference_eval.json

The time per slice is measured on the held-out TotalSeg CT with the ensemble (torch
threads as set by ``--threads``), wall clock around ``suggest_slices``.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from napari_propseg.io import read_labels, read_volume
from napari_propseg.labelmap import FLARE_NAMES, map_totalsegmentator, read_label_map
from napari_propseg.metrics import compute_metrics
from napari_propseg.phantom import make_phantom
from napari_propseg.reference import load_reference_model
from napari_propseg.reference.inference import suggest_slices


def real_cases(data: Path) -> list[dict]:
    ts = data / "totalseg_example"
    return [
        {"name": "totalseg_ct", "image": ts / "example_ct.nii.gz", "labels": ts / "example_seg_v1.nii.gz",
         "map": ts / "labels.json", "key": "v1"},
        {"name": "totalseg_dicom", "image": ts / "example_ct_dicom", "labels": ts / "example_seg_dicom_on_ct_grid.nii.gz",
         "map": ts / "labels.json", "key": "v2"},
    ]


def load_case(case: dict) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """``(hu (Z, Y, X), FLARE labels (Z, Y, X), spacing)`` of a real case."""
    vol = read_volume(case["image"])
    lab = read_labels(case["labels"], vol).array
    names = read_label_map(case["map"], case["key"])
    return vol.array, map_totalsegmentator(lab, names), tuple(vol.spacing)


def score(pred: np.ndarray, gt: np.ndarray, spacing) -> dict[str, float]:
    """Dice per organ present in the ground truth (FLARE names)."""
    ids = [int(i) for i in np.unique(gt) if i > 0]
    rows = compute_metrics(pred, gt, spacing, labels=ids)
    return {FLARE_NAMES.get(r["label"], str(r["label"])): float(r["dice"]) for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("weights", nargs=2, help="the two reference weight files (A, B)")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--phantom-seed", type=int, default=999, help="seed of the unseen phantom (training used 100-105)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {"A": load_reference_model(args.weights[0]), "B": load_reference_model(args.weights[1])}
    combos = {"A": [models["A"]], "B": [models["B"]], "ensemble": [models["A"], models["B"]]}
    cases = []
    for c in real_cases(Path(args.data)):
        hu, gt, spacing = load_case(c)
        cases.append((c["name"], hu, gt, spacing))
    ct, lab = make_phantom((64, 160, 160), (3.0, 2.0, 2.0), args.phantom_seed)
    cases.append((f"phantom_seed{args.phantom_seed}", ct.array, lab.array.astype(np.uint8), tuple(ct.spacing)))
    result: dict = {"weights": args.weights, "machine": f"{platform.processor() or platform.machine()}, torch threads {args.threads}",
                    "cases": {}}
    for name, hu, gt, spacing in cases:
        z = hu.shape[0]
        res = {}
        for combo, nets in combos.items():
            t0 = time.perf_counter()
            sug = suggest_slices(hu, nets, k=z, device="cpu")
            seconds = time.perf_counter() - t0
            per = score(sug.labels, gt, spacing)
            res[combo] = {"dice": per, "mean": float(np.mean(list(per.values()))), "seconds_per_slice": seconds / z}
        result["cases"][name] = {"shape": list(hu.shape), **res}
        print(f"{name}: " + ", ".join(f"{k} {v['mean']:.3f}" for k, v in res.items())
              + f" (ensemble {res['ensemble']['seconds_per_slice']:.3f} s/slice)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    # Markdown table: organ x case (ensemble Dice)
    names = sorted({o for c in result["cases"].values() for o in c["ensemble"]["dice"]}, key=lambda n: list(FLARE_NAMES.values()).index(n) if n in FLARE_NAMES.values() else 99)
    print("\n| organ | " + " | ".join(result["cases"]) + " |")
    print("|---|" + "---|" * len(result["cases"]))
    for o in names:
        cells = [f"{c['ensemble']['dice'][o]:.3f}" if o in c["ensemble"]["dice"] else "-" for c in result["cases"].values()]
        print(f"| {o} | " + " | ".join(cells) + " |")
    for combo in combos:
        print(f"| **mean, {combo}** | " + " | ".join(f"{c[combo]['mean']:.3f}" for c in result["cases"].values()) + " |")


if __name__ == "__main__":
    main()
