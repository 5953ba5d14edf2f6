"""PROTOCOL.md section 2: the whole correction loop (the simulated clinician, many rounds).

Start: k ground-truth slices (``round(linspace(z_lo, z_hi, k))`` over the foreground
extent, i.e. the clinician drew k evenly spaced slices), or a given initial label volume
with its anchor slices (e.g. the reference module's prediction on its own sampled slices).
The tool propagates. Then, each round, the simulated clinician replaces ONE slice by its
ground truth and the tool re-propagates (``engine.repropagate(labels, anchors,
changed=[z])``); the mean Dice over the volume and the seconds of the round are recorded.

Which slice the clinician corrects (``policy``):

* ``suggest``: the slice the tool proposes, ``engine.suggest_next(confidence, anchors)``,
  computed from the tool's own per-slice confidence only: the clinician sees only what the
  tool shows (no ground truth enters the choice).
* ``oracle``: the slice with the worst Dice against the ground truth (ties: most wrong
  voxels); an upper bound on what a perfect suggestion could do.
* ``random``: a uniformly random slice not yet corrected (seeded).

The mean Dice over the volume is the mean over the labels present in the ground truth of
each label's Dice over the whole volume (anchors included: they are part of what the
clinician ends up with). Seconds per round are the tool's time (suggestion plus
re-propagation), not the simulated human's; the oracle's choice is not timed.

Outputs: :func:`write_loop_report` writes JSON, a PNG of the curves (mean Dice against the
number of corrected slices) and a markdown table of the slices and seconds needed to reach
mean Dice 0.90 and 0.95.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..progress import check_cancel, report
from .protocol import (
    PeakMemory,
    _as_label_array,
    _check_gt,
    dice_per_label,
    foreground_extent,
    make_seeds,
    make_stcn_engine,
    save_figure,
    start_slices,
    volume_mean_dice,
    write_report,
)

log = logging.getLogger(__name__)

POLICIES = ("suggest", "oracle", "random")
LOOP_METHODS = ("stcn", "interp")
DEFAULT_TARGETS = (0.90, 0.95)
MAX_PANELS = 4  # more cases than this: one panel of all curves and their mean

EngineFactory = Callable[[str], Any]


def slice_scores(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per axial slice: mean Dice over the labels present in that slice (GT or prediction;
    1.0 where both are empty) and the number of wrong voxels.

    Args:
        pred, gt: (Z, Y, X) integer label volumes.

    Returns:
        ``(dice, wrong)``: two (Z,) arrays.
    """
    z = gt.shape[0]
    wrong = np.count_nonzero((pred != gt).reshape(z, -1), axis=1)
    ids = sorted((set(np.unique(gt).tolist()) | set(np.unique(pred).tolist())) - {0})
    total = np.zeros(z)
    count = np.zeros(z)
    for lab in ids:
        p = (pred == lab).reshape(z, -1)
        g = (gt == lab).reshape(z, -1)
        inter = np.count_nonzero(p & g, axis=1)
        denom = np.count_nonzero(p, axis=1) + np.count_nonzero(g, axis=1)
        present = denom > 0
        total[present] += 2.0 * inter[present] / denom[present]
        count[present] += 1
    dice = np.where(count > 0, total / np.maximum(count, 1), 1.0)
    return dice, wrong


def choice_rank(pred: np.ndarray, gt: np.ndarray, z: int, candidates: Sequence[int]) -> float:
    """How bad the chosen slice was among the candidates, before its correction: the
    fraction of the other candidates with a strictly lower slice Dice (ties count half).

    0.0 = the worst slice (what the oracle picks), about 0.5 = no better than chance,
    1.0 = the best slice. NaN with a single candidate. Used to judge the tool's
    suggestions against the ground truth (the suggestion itself never sees it).
    """
    others = [c for c in candidates if c != z]
    if not others:
        return math.nan
    dice, _ = slice_scores(pred[[z] + others], gt[[z] + others])
    d_z, d_o = dice[0], dice[1:]
    return float((np.count_nonzero(d_o < d_z) + 0.5 * np.count_nonzero(d_o == d_z)) / len(others))


def _choose(policy: str, candidates: list[int], *, pred, gt, engine, confidence, anchors, rng) -> int | None:
    if not candidates:
        return None
    if policy == "random":
        return int(rng.choice(candidates))
    if policy == "oracle":
        dice, wrong = slice_scores(pred, gt)
        cand = np.asarray(candidates)
        order = np.lexsort((-wrong[cand], dice[cand]))  # worst Dice first, then most wrong voxels
        return int(cand[order[0]])
    if policy == "suggest":
        try:
            z = engine.suggest_next(confidence, list(anchors))
        except InputError as exc:  # e.g. every slice is an anchor
            log.info("no suggestion left: %s", exc)
            return None
        if z is None:
            return None
        z = int(z)
        if z not in candidates:
            log.warning("the tool suggested slice %d, which is not a candidate (anchor or corrected); stopping", z)
            return None
        return z
    raise InputError(f"Unknown correction policy {policy!r}; choose from {', '.join(POLICIES)}.")


def _default_factory(image_hu: np.ndarray, weights, device: str, spacing: Sequence[float] | None = None) -> EngineFactory:
    def make(method: str):
        return make_stcn_engine(image_hu, method=method, weights=weights if method == "stcn" else None, device=device,
                                spacing=spacing)

    return make


def run_loop(
    image_hu: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    *,
    methods: Sequence[str] = LOOP_METHODS,
    policies: Sequence[str] = POLICIES,
    k: int = 3,
    initial: tuple | None = None,
    targets: Sequence[float] = DEFAULT_TARGETS,
    max_rounds: int | None = None,
    stop_at_target: bool = True,
    weights: str | os.PathLike | None = None,
    device: str = "cpu",
    seed: int = 0,
    case: str = "case",
    engine_factory: EngineFactory | None = None,
    progress=None,
    cancel=None,
) -> dict[str, Any]:
    """Run the correction loop for every method and policy on one case.

    Args:
        image_hu: CT in HU, shape (Z, Y, X).
        gt: ground-truth labels, shape (Z, Y, X), integer.
        spacing: (sz, sy, sx) in mm (recorded, and given to the default engine factory).
        methods: engine methods (``stcn``, ``interp``).
        policies: subset of :data:`POLICIES`.
        k: number of evenly spaced GT start slices (ignored with ``initial``).
        initial: ``(labels, anchors)`` or ``(labels, anchors, agreement)`` to start from
            instead (e.g. the reference module's prediction on its sampled slices);
            ``labels`` (Z, Y, X) holds the anchors. These start anchors are unverified: the
            ``suggest`` policy checks them first, as the widget's Check next does, least
            agreed first (``agreement``: slice -> the reference pair's agreement, else
            ascending z), then follows the engine's confidence.
        targets: mean-Dice levels whose cost (slices, seconds) is reported.
        max_rounds: cap on corrected slices (default: every slice).
        stop_at_target: stop a curve once the highest target is reached.
        weights, device: for the STCN engine.
        seed: seed of the ``random`` policy.
        case: case name for the report.
        engine_factory: ``method -> engine`` (default: ``PropagationEngine(image_hu,
            method=..., weights=..., device=..., spacing=...)``). An engine has ``propagate(labels,
            anchors)`` and ``repropagate(labels, anchors, changed=[z])`` returning an
            object with ``labels`` (Z, Y, X) and ``confidence`` (Z,), and
            ``suggest_next(confidence, anchors) -> int | None``.
        progress: ``(step, total, message)`` callback, once per round.
        cancel: callable returning True to stop.

    Returns:
        JSON-able dict with ``curves``: one per (method, policy) with ``rounds`` (list of
        ``{"corrected", "slice", "mean_dice", "seconds"}``, round 0 = initial
        propagation), ``reached`` ({target: {"corrected", "seconds"} or None}),
        ``anchors_unchanged`` and ``peak_mb`` (RSS growth over the whole curve); or ``{"skipped": reason}``.
    """
    gt = _check_gt(gt)
    image_hu = np.asarray(image_hu)
    if image_hu.shape != gt.shape:
        raise InputError(f"Image shape {image_hu.shape} differs from label shape {gt.shape} in case {case}; put both on one grid.")
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise InputError(f"Unknown correction policy {', '.join(bad)}; choose from {', '.join(POLICIES)}.")
    labels_present = [int(v) for v in np.unique(gt) if v != 0]
    z = gt.shape[0]
    if initial is None:
        anchors0 = start_slices(gt, k)
        labels0 = make_seeds(gt, anchors0)
        start = f"{len(anchors0)} ground-truth slices"
    else:
        labels0 = np.asarray(initial[0])
        anchors0 = sorted({int(a) for a in initial[1]})
        if labels0.shape != gt.shape:
            raise InputError(f"The initial label volume has shape {labels0.shape}, the ground truth {gt.shape}; they must match.")
        start = f"given initial labels with {len(anchors0)} anchor slices"
    agreement = dict(initial[2]) if initial is not None and len(initial) > 2 and initial[2] else {}
    unverified0 = [] if initial is None else sorted(anchors0, key=lambda a: (agreement.get(a, 0.0), a))
    cap = z if max_rounds is None else int(max_rounds)
    factory = engine_factory or _default_factory(image_hu, weights, device, spacing)
    out: dict[str, Any] = {
        "case": case, "shape": list(gt.shape), "spacing": [float(s) for s in spacing],
        "start": start, "start_slices": anchors0, "targets": [float(t) for t in targets],
        "labels": labels_present, "curves": [],
    }
    hi_target = max(targets) if targets else 1.0
    failed: dict[str, str] = {}
    for method in methods:
        for policy in policies:
            check_cancel(cancel)
            entry: dict[str, Any] = {"method": method, "policy": policy}
            if method in failed:
                entry["skipped"] = failed[method]
                out["curves"].append(entry)
                continue
            try:
                t0 = time.perf_counter()
                engine = factory(method)
                entry["setup_seconds"] = time.perf_counter() - t0
            except (InputError, ImportError) as exc:
                reason = str(exc) if isinstance(exc, InputError) else f"not available ({exc})"
                log.warning("loop %s: method %s skipped: %s", case, method, reason)
                failed[method] = reason
                entry["skipped"] = reason
                out["curves"].append(entry)
                continue
            if policy == "suggest" and not hasattr(engine, "suggest_next"):
                entry["skipped"] = f"the {method} engine offers no suggest_next"
                out["curves"].append(entry)
                continue
            entry.update(_run_curve(engine, labels0, anchors0, gt, labels_present, policy=policy, cap=cap,
                                    unverified=unverified0, free_anchors=initial is not None,
                                    stop_at=hi_target if stop_at_target else None, targets=targets, rng=np.random.default_rng(seed), case=case, method=method,
                                    progress=progress, cancel=cancel))
            out["curves"].append(entry)
    return out


def _run_curve(engine, labels0, anchors0, gt, labels_present, *, policy, cap, unverified, free_anchors, stop_at, targets,
               rng, case, method, progress, cancel) -> dict[str, Any]:
    """One (method, policy) curve: the initial propagation, then one corrected slice a round.

    ``free_anchors``: the start anchors are unverified (a reference prediction), so they may
    be corrected too; ``stop_at``: stop once mean Dice reaches it (None = never).
    """
    z = gt.shape[0]
    anchors = list(anchors0)
    corrected: set[int] = set()
    with PeakMemory(trace=False) as mem:  # RSS growth: the loop also scores
        t0 = time.perf_counter()
        res = engine.propagate(labels0.copy(), list(anchors))
        secs = time.perf_counter() - t0
        pred = _as_label_array(res)
        conf = getattr(res, "confidence", None)
        ok = bool(np.array_equal(pred[anchors], labels0[anchors]))
        rounds = [{"corrected": 0, "slice": None, "mean_dice": volume_mean_dice(pred, gt, labels_present), "seconds": secs}]
        for r in range(1, cap + 1):
            check_cancel(cancel)
            if stop_at is not None and rounds[-1]["mean_dice"] >= stop_at:
                break
            candidates = [s for s in range(z) if s not in corrected and (free_anchors or s not in anchors)]
            t0 = time.perf_counter()
            pending = [a for a in unverified if a not in corrected]
            if policy == "suggest" and pending:
                zc = pending[0]  # the tool asks to check its own suggested slices first
            else:
                zc = _choose(policy, candidates, pred=pred, gt=gt, engine=engine, confidence=conf, anchors=anchors, rng=rng)
            t_choose = time.perf_counter() - t0 if policy == "suggest" else 0.0
            if zc is None:
                break
            rank = choice_rank(pred, gt, zc, candidates)
            labels = pred.copy()
            labels[zc] = gt[zc]
            corrected.add(zc)
            if zc not in anchors:
                anchors = sorted(anchors + [zc])
            t0 = time.perf_counter()
            res = engine.repropagate(labels, list(anchors), changed=[zc])
            secs = time.perf_counter() - t0 + t_choose
            pred = _as_label_array(res)
            conf = getattr(res, "confidence", None)
            ok = ok and bool(np.array_equal(pred[anchors], labels[anchors]))
            rounds.append({"corrected": r, "slice": zc, "mean_dice": volume_mean_dice(pred, gt, labels_present),
                           "seconds": secs, "choice_rank": rank})
            report(progress, r, cap, f"{case} {method}/{policy}: round {r}, mean Dice {rounds[-1]['mean_dice']:.3f}")
    if not ok:
        log.error("loop %s: %s/%s changed an anchor slice", case, method, policy)
    cum = np.cumsum([x["seconds"] for x in rounds])
    reached: dict[str, Any] = {}
    for t in targets:
        hit = next((i for i, x in enumerate(rounds) if x["mean_dice"] >= t), None)
        reached[f"{t:.2f}"] = None if hit is None else {"corrected": rounds[hit]["corrected"], "seconds": float(cum[hit])}
    ranks = [x["choice_rank"] for x in rounds[1:] if not math.isnan(x["choice_rank"])]
    log.info("loop %s %s/%s: %d rounds, Dice %.3f -> %.3f", case, method, policy, len(rounds) - 1,
             rounds[0]["mean_dice"], rounds[-1]["mean_dice"])
    return dict(rounds=rounds, reached=reached, anchors_unchanged=ok, peak_mb=mem.peak_mb,
                mean_choice_rank=float(np.mean(ranks)) if ranks else math.nan,
                final_dice=rounds[-1]["mean_dice"], total_seconds=float(cum[-1]),
                mean_round_seconds=float(np.mean([x["seconds"] for x in rounds[1:]])) if len(rounds) > 1 else math.nan)


# --------------------------------------------------------------------------- reports


def loop_markdown(results: Sequence[Mapping[str, Any]], machine: str = "") -> str:
    """Markdown table: per case, method and policy, the slices and seconds to reach each target."""
    lines = ["# Whole correction loop (PROTOCOL.md section 2)", ""]
    if machine:
        lines += [f"Machine: {machine}", ""]
    if len(results) > 1:
        lines += [summary_markdown(loop_summary(results))]
    for res in results:
        targets = [f"{t:.2f}" for t in res["targets"]]
        lines += [f"## {res['case']}  (shape {tuple(res['shape'])}; start: {res['start']})", ""]
        head = ("| method | policy | start Dice | " + " | ".join(f"slices to {t} | s to {t}" for t in targets)
                + " | final Dice (slices) | s/round | choice rank |")
        lines += [head, "|" + "---|" * (6 + 2 * len(targets))]
        skipped: dict[str, str] = {}
        for c in res["curves"]:
            if "skipped" in c:
                key = c["method"] if skipped.get(c["method"], c["skipped"]) == c["skipped"] else f"{c['method']} ({c['policy']})"
                skipped[key] = c["skipped"]
                continue
            cells = []
            for t in targets:
                r = c["reached"].get(t)
                cells += ["not reached", "-"] if r is None else [str(r["corrected"]), f"{r['seconds']:.1f}"]
            mr = c["mean_round_seconds"]
            cr = c.get("mean_choice_rank", math.nan)
            lines.append(f"| {c['method']} | {c['policy']} | {c['rounds'][0]['mean_dice']:.3f} | " + " | ".join(cells)
                         + f" | {c['final_dice']:.3f} ({c['rounds'][-1]['corrected']}) | {'-' if math.isnan(mr) else f'{mr:.2f}'} | "
                         + ("-" if math.isnan(cr) else f"{cr:.2f}") + " |")
        lines.append("")
        for m, why in skipped.items():
            lines += [f"Skipped {m}: {why}", ""]
        lines += ["Slices = corrected slices after the start; s = cumulative tool seconds (initial propagation "
                  "included); s/round = mean seconds of one suggestion + re-propagation; choice rank = mean fraction "
                  "of the other candidate slices that were worse than the corrected one (0 = always the worst slice, "
                  "as the oracle; about 0.5 = chance).", ""]
    return "\n".join(lines)


def _dice_after(curve: Mapping[str, Any], n: int) -> float:
    """Mean Dice after ``n`` corrected slices; a curve that stopped earlier (target reached,
    or no slice left) keeps its last value."""
    best = curve["rounds"][0]["mean_dice"]
    for r in curve["rounds"]:
        if r["corrected"] > n:
            break
        best = r["mean_dice"]
    return float(best)


def _slices_to(curve: Mapping[str, Any], target: str) -> int:
    """Corrected slices to reach ``target``; one more than the curve corrected when it never did
    (a lower bound: the curve was cut by ``--max-rounds``)."""
    hit = curve["reached"].get(target)
    return int(hit["corrected"]) if hit else int(curve["rounds"][-1]["corrected"]) + 1


def loop_summary(results: Sequence[Mapping[str, Any]], checkpoints: Sequence[int] = (0, 5, 10, 20, 40)) -> dict[str, Any]:
    """The mean over cases (PROTOCOL.md section 4) of each (method, policy) curve.

    Per curve: the cases, how many reached each target, the mean corrected slices to it over
    the cases that reached it under every policy of that method (paired, so policies are
    compared on the same cases), the ratio of those means to the ``random`` policy's, the same
    over every case with an unreached target counted as one slice past the curve's end
    (``mean_slices_all``, ``ratio_to_random_all``), and the mean Dice after fixed numbers of
    corrected slices.
    """
    by: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for res in results:
        for c in res["curves"]:
            if "skipped" not in c:
                by.setdefault((c["method"], c["policy"]), []).append(dict(c, case=res["case"]))
    targets = sorted({f"{t:.2f}" for res in results for t in res["targets"]})
    cap = max((c["rounds"][-1]["corrected"] for cs in by.values() for c in cs), default=0)
    out: list[dict[str, Any]] = []
    for (method, policy), curves in by.items():
        entry: dict[str, Any] = {"method": method, "policy": policy, "cases": len(curves), "reached": {},
                                 "dice_after": {str(n): float(np.mean([_dice_after(c, n) for c in curves]))
                                                for n in checkpoints if n <= cap}}
        peers = {p: {c["case"]: c for c in cs} for (m, p), cs in by.items() if m == method}
        for t in targets:
            hits = {c["case"]: c["reached"].get(t) for c in curves}
            paired = [case for case in hits if all((peers[p].get(case) or {}).get("reached", {}).get(t) for p in peers)]
            mean = float(np.mean([hits[case]["corrected"] for case in paired])) if paired else math.nan
            row = {"cases_reached": sum(v is not None for v in hits.values()), "paired_cases": len(paired),
                   "mean_slices_paired": mean}
            if "random" in peers and paired:
                rnd = float(np.mean([peers["random"][case]["reached"][t]["corrected"] for case in paired]))
                row["ratio_to_random"] = mean / rnd if rnd else math.nan
            # every case, a curve that never reached t counted as one slice more than it corrected
            row["mean_slices_all"] = float(np.mean([_slices_to(c, t) for c in curves]))
            if "random" in peers:
                rnd_all = [_slices_to(peers["random"][c["case"]], t) for c in curves if c["case"] in peers["random"]]
                rnd_mean = float(np.mean(rnd_all)) if rnd_all else 0.0
                row["ratio_to_random_all"] = row["mean_slices_all"] / rnd_mean if rnd_mean else math.nan
            entry["reached"][t] = row
        out.append(entry)
    return {"curves": out, "cases": len(results)}


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """Markdown: the mean over cases of :func:`loop_summary`."""
    curves = summary["curves"]
    if not curves:
        return ""
    targets = list(curves[0]["reached"])
    points = list(curves[0]["dice_after"])
    lines = [f"## Mean over {summary['cases']} cases", "",
             "| method | policy | " + " | ".join(f"reached {t} | slices to {t} (paired) | x random | "
                                                 f"slices to {t} (all) | x random (all)" for t in targets)
             + " | " + " | ".join(f"Dice after {n}" for n in points) + " |",
             "|" + "---|" * (2 + 5 * len(targets) + len(points))]
    for c in curves:
        cells = []
        for t in targets:
            r = c["reached"][t]
            ratio = r.get("ratio_to_random", math.nan)
            cells += [f"{r['cases_reached']}/{c['cases']}",
                      "-" if math.isnan(r["mean_slices_paired"]) else f"{r['mean_slices_paired']:.1f} ({r['paired_cases']})",
                      "-" if math.isnan(ratio) else f"{ratio:.2f}"]
            ratio_all = r.get("ratio_to_random_all", math.nan)
            cells += [f"{r['mean_slices_all']:.1f}", "-" if math.isnan(ratio_all) else f"{ratio_all:.2f}"]
        cells += [f"{c['dice_after'][n]:.3f}" for n in points]
        lines.append(f"| {c['method']} | {c['policy']} | " + " | ".join(cells) + " |")
    lines += ["", "Paired: over the cases that reached the target under every policy of that method; x random = "
              "that mean over the random policy's on the same cases. All: every case, a target not reached "
              "counted as one slice past the curve's last correction (a lower bound when --max-rounds cut it). Dice after n: curves that stopped earlier "
              "keep their last value.", ""]
    return "\n".join(lines)


def plot_loop(results: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """PNG: mean Dice against corrected slices; colour = method, line style = policy."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    styles = {"suggest": ("-", "o"), "oracle": ("--", "s"), "random": (":", "^")}
    colours: dict[str, str] = {}
    palette = ["tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple"]
    if len(results) > MAX_PANELS:
        return _plot_mean_curves(results, path, Figure, styles, colours, palette)
    n = max(1, len(results))
    fig = Figure(figsize=(5 * n, 4), dpi=110)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, res in zip(axes, results):
        for c in res["curves"]:
            if "skipped" in c:
                continue
            col = colours.setdefault(c["method"], palette[len(colours) % len(palette)])
            xs = [r["corrected"] for r in c["rounds"]]
            ys = [r["mean_dice"] for r in c["rounds"]]
            ls, mk = styles.get(c["policy"], ("-", "."))
            ax.plot(xs, ys, linestyle=ls, marker=mk, markersize=3, color=col, label=f"{c['method']} / {c['policy']}")
        _decorate(ax, res["targets"], f"{res['case']} (start: {res['start']})")
    return save_figure(fig, path)


def _plot_mean_curves(results, path, Figure, styles, colours, palette) -> Path:
    """One panel for a dataset: each case's curve thin, the mean over cases thick (a curve
    that stopped keeps its last value, as in :func:`loop_summary`)."""
    fig = Figure(figsize=(6.5, 4.5), dpi=110)
    ax = fig.subplots()
    cap = max((c["rounds"][-1]["corrected"] for res in results for c in res["curves"] if "skipped" not in c), default=0)
    xs = list(range(cap + 1))
    groups: dict[tuple[str, str], list] = {}
    for res in results:
        for c in res["curves"]:
            if "skipped" not in c:
                groups.setdefault((c["method"], c["policy"]), []).append([_dice_after(c, x) for x in xs])
    for (method, policy), ys in groups.items():
        col = colours.setdefault(method, palette[len(colours) % len(palette)])
        ls, _ = styles.get(policy, ("-", "."))
        for y in ys:
            ax.plot(xs, y, linestyle=ls, color=col, lw=0.5, alpha=0.2)
        ax.plot(xs, np.mean(ys, axis=0), linestyle=ls, color=col, lw=2.0, label=f"{method} / {policy} (mean of {len(ys)})")
    _decorate(ax, results[0]["targets"], f"{len(results)} cases (start: {results[0]['start']})")
    return save_figure(fig, path)


def _decorate(ax, targets, title: str) -> None:
    """Target lines, axis labels, title, grid and legend of a loop panel."""
    for t in targets:
        ax.axhline(t, color="grey", lw=0.6, alpha=0.6)
    ax.set_xlabel("corrected slices")
    ax.set_ylabel("mean Dice (volume)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def write_loop_report(results: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, *,
                      machine: str = "", stem: str = "loop") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.png`` and ``<stem>.md`` into ``out_dir``."""
    extra = {"mean_over_cases": loop_summary(results)} if len(results) > 1 else None
    return write_report(results, out_dir, section="PROTOCOL.md section 2", machine=machine, stem=stem,
                        plot=plot_loop, markdown=loop_markdown, extra=extra)
