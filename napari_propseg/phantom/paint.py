"""Painting one phantom slice: the tissue and label maps, organ by organ in anatomical order.

Part of :mod:`napari_propseg.phantom`; :func:`_paint_slice` is the entry point. The stages run
in a fixed order (later ones overwrite earlier ones), which the labels depend on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .anatomy import _Anatomy
from .shapes import (AORTA, GALLBLADDER, IVC, KIDNEY_L, KIDNEY_R, LIVER, PANCREAS, SPLEEN, STOMACH, VERTEBRAE, _T,
                     _Grid, _blob_field, _blob_window, _paint, _ramp)

#: ``clip`` default of :meth:`_Slice.blob_paint`: clip to the abdominal cavity.
_CAVITY = object()


@dataclass
class _Slice:
    """One slice being painted: its inputs, its two maps and the body geometry."""

    k: int
    an: _Anatomy
    grid: _Grid
    U: np.ndarray
    V: np.ndarray
    bowel_f: np.ndarray
    vessel_f: np.ndarray
    min_size: float
    tissue: np.ndarray
    labels: np.ndarray
    # set by _paint_body
    rho: np.ndarray | None = None
    body: np.ndarray | None = None
    dvv: np.ndarray | None = None
    inner_fat: float = 0.0
    cavity_r: float = 0.0
    cavity: np.ndarray | None = None

    @property
    def t(self) -> float:
        return self.an.t[self.k]

    @property
    def B(self) -> dict:
        return self.an.blobs

    @property
    def full(self) -> tuple[slice, slice]:
        return (slice(0, self.grid.v.size), slice(0, self.grid.u.size))

    def blob_paint(self, name, tissue_id, label_id, clip=_CAVITY, grow=1.0, dx=0.0, dy=0.0):
        """Paint blob ``name`` (clipped to ``clip``, the cavity by default); returns
        ``(win, mask, field, xl, yl)`` or None when the blob is absent from this slice."""
        if clip is _CAVITY:
            clip = self.cavity
        k, grid, tissue, labels, B, min_size = self.k, self.grid, self.tissue, self.labels, self.B, self.min_size

        blob = B[name]
        if not blob.present(k, min_size):
            return None
        win = _blob_window(grid, blob, k, pad=grow * (1 + abs(dx) + abs(dy)))
        if win is None:
            return None
        f, xl, yl = _blob_field(blob, k, win[2], win[3], dx=dx, dy=dy, grow=grow)
        m = f < 1.0
        if clip is not None:
            m &= clip[win[0], win[1]]
        _paint(tissue, labels, win, m, tissue_id, label_id)
        return win, m, f, xl, yl


def _paint_body(sl: _Slice) -> None:
    """Table, body outline, skin, fat and the abdominal wall; sets the body geometry."""
    k, an, U, V, tissue, labels, full = sl.k, sl.an, sl.U, sl.V, sl.tissue, sl.labels, sl.full
    du = (U - an.body_cx[k]) / an.body_a[k]
    dvv = V - an.body_cy[k]
    dv = dvv / np.where(dvv < 0, an.body_b_ant[k], an.body_b_post[k])
    rho = (np.abs(du) ** 2.4 + np.abs(dv) ** 2.4) ** (1 / 2.4)
    body = rho < 1.0
    inner_fat = 1.0 - an.fat[k]
    cavity_r = inner_fat - an.muscle
    # rectus abdominis: the wall is thicker anteriorly near the midline
    rectus = an.muscle * 1.2 * np.exp(-((U - an.body_cx[k]) / 0.2) ** 2) * (dvv < 0)
    cavity = rho < cavity_r - rectus
    # CT table under the patient
    v_tab = an.body_cy[k] + an.body_b_post[k] + 0.06
    tab_c = v_tab + 0.12 * U ** 2
    table = (V > tab_c) & (V < tab_c + 0.06) & (np.abs(U) < 0.95) & ~body
    _paint(tissue, labels, full, table, _T["table"], 0)
    _paint(tissue, labels, full, table & ((V < tab_c + 0.008) | (V > tab_c + 0.052)), _T["table_shell"], 0)
    _paint(tissue, labels, full, body, _T["fat"], 0)
    _paint(tissue, labels, full, body & (rho > 0.985), _T["skin"], 0)
    wall = (rho < inner_fat) & ~cavity
    _paint(tissue, labels, full, wall, _T["muscle"], 0)
    # linea alba: thin fat gap in the anterior wall
    _paint(tissue, labels, full, wall & (np.abs(U - an.body_cx[k]) < 0.012) & (dvv < 0), _T["fat"], 0)
    sl.rho, sl.body, sl.dvv, sl.inner_fat, sl.cavity_r, sl.cavity = rho, body, dvv, inner_fat, cavity_r, cavity


def _paint_chest(sl: _Slice) -> None:
    """Lung bases (with vessels) and the heart."""
    (U, vessel_f, tissue, labels, cavity, blob_paint) = (
        sl.U, sl.vessel_f, sl.tissue, sl.labels, sl.cavity, sl.blob_paint,
    )
    # --- lungs (bases): lateral and posterior, inside the rib cage
    for name in ("lung_r", "lung_l"):
        res = blob_paint(name, _T["lung"], 0, clip=cavity & (np.abs(U) > 0.1))
        if res is not None:
            win, m, *_ = res
            vf = vessel_f[win[0], win[1]]
            _paint(tissue, labels, win, m & (np.abs(vf) < 0.05), _T["lung_vessel"], 0)
    res = blob_paint("heart", _T["fat"], 0, grow=1.12)
    if res is not None:
        win, m, f, *_ = res
        _paint(tissue, labels, win, m & (f < 1.0 / 1.12), _T["muscle"], 0)
        _paint(tissue, labels, win, m & (f < 0.7 / 1.12), _T["heart_blood"], 0)


def _paint_bowel(sl: _Slice) -> None:
    """Small bowel loops (gas, fluid) and the colon."""
    (k, t, an, V, bowel_f, vessel_f, tissue, labels, full, rho, cavity_r, cavity, blob_paint) = (
        sl.k, sl.t, sl.an, sl.V, sl.bowel_f, sl.vessel_f, sl.tissue, sl.labels, sl.full, sl.rho, sl.cavity_r,
        sl.cavity, sl.blob_paint,
    )
    # --- small bowel loops (mesenteric fat between), with gas in some loops
    if t < an.extra["bowel_top"] + 0.06:
        w_top = _ramp(np.array([t]), an.extra["bowel_top"] + 0.06, an.extra["bowel_top"] - 0.04)[0]
        thr = 0.25 + 1.5 * (1 - w_top)
        region = cavity & (V < an.spine_v[k] - 0.05) & (rho < cavity_r - 0.02)
        loops = region & (bowel_f > thr)
        _paint(tissue, labels, full, loops, _T["bowel"], 0)
        _paint(tissue, labels, full, loops & (bowel_f > thr + 0.9) & (vessel_f > 0.3), _T["gas"], 0)
        _paint(tissue, labels, full, loops & (bowel_f > thr + 0.5) & (bowel_f < thr + 0.9) & (vessel_f < -0.6),
               _T["stomach_fluid"], 0)
    # colon with gas and stool
    for name in ("colon_r", "colon_l"):
        res = blob_paint(name, _T["bowel"], 0)
        if res is not None:
            win, m, f, xl, yl = res
            lumen = m & (f < 0.8)
            _paint(tissue, labels, win, lumen & (yl < 0.1), _T["gas"], 0)
            _paint(tissue, labels, win, lumen & (yl >= 0.1) & (bowel_f[win[0], win[1]] > -0.2), _T["gas"], 0)


def _paint_liver_spleen(sl: _Slice) -> None:
    """Liver lobes (fissure, vessels), gallbladder and spleen."""
    (k, t, an, vessel_f, tissue, labels, B, cavity, blob_paint) = (
        sl.k, sl.t, sl.an, sl.vessel_f, sl.tissue, sl.labels, sl.B, sl.cavity, sl.blob_paint,
    )
    # --- liver: right + left lobe minus the ligamentum-teres fissure on low slices
    res_r = blob_paint("liver_r", _T["liver"], LIVER)
    res_l = blob_paint("liver_l", _T["liver"], LIVER)
    if res_l is not None and t < an.extra["fissure_top"]:
        win, m, f, xl, yl = res_l
        # fat gap along the right (medial) edge of the left lobe separates the pieces
        gap = (xl < -0.55) & (xl > -1.6) & cavity[win[0], win[1]]
        _paint(tissue, labels, win, gap & (labels[win[0], win[1]] == LIVER), _T["fat"], 0)
    for res in (res_r, res_l):
        if res is not None:
            win = res[0]
            sub_l = labels[win[0], win[1]] == LIVER
            vf = vessel_f[win[0], win[1]]
            _paint(tissue, labels, win, sub_l & (np.abs(vf) < 0.09), _T["liver_vessel"], None)
    blob_paint("gallbladder", _T["gallbladder"], GALLBLADDER)

    # --- spleen crescent (concave hilum facing anteromedially)
    res = blob_paint("spleen", _T["spleen"], SPLEEN)
    if res is not None:
        win, m, f, xl, yl = res
        g, _, _ = _blob_field(B["spleen"], k, win[2], win[3], dx=-1.25, dy=0.0, grow=0.6)
        hilum = m & (g < 1.0)
        _paint(tissue, labels, win, hilum, _T["fat"], 0)


def _paint_stomach_pancreas(sl: _Slice) -> None:
    """Stomach (wall, fluid, gas) and pancreas."""
    (k, t, an, grid, bowel_f, tissue, labels, B, cavity, blob_paint) = (
        sl.k, sl.t, sl.an, sl.grid, sl.bowel_f, sl.tissue, sl.labels, sl.B, sl.cavity, sl.blob_paint,
    )
    # --- stomach: wall, gas anteriorly (patient supine: gas rises to low v), fluid
    for name in ("stomach_body", "stomach_antrum"):
        res = blob_paint(name, _T["stomach_wall"], STOMACH)
        if res is not None:
            win, m, f, xl, yl = res
            lumen = m & (f < 0.8)
            blob = B[name]
            depth = blob.scale[k] * max(blob.a[k], blob.b[k])
            level = blob.cy[k] - depth * (1 - 2 * an.extra["gas_frac"])
            _paint(tissue, labels, win, lumen, _T["stomach_fluid"], None)
            _paint(tissue, labels, win, lumen & (win[3] < level), _T["gas"], None)

    # --- pancreas: curved band, head near the IVC, tail toward the splenic hilum
    P = an.extra["pancreas"]
    if P["t0"] < t < P["t1"]:
        s = (t - P["t0"]) / (P["t1"] - P["t0"])
        uc = -0.16 + 0.62 * s
        half = 0.08 + 0.22 * math.sin(math.pi * s) ** 0.5
        win = grid.window(uc, 0.0, half + 0.01, 0.35)
        if win is not None:
            Uw, Vw = win[2], win[3]
            vc = -0.11 + P["dv"] + P["wob"][k] + P["bend"] * np.clip(Uw - 0.0, 0, None) ** 2 \
                - 0.25 * np.clip(-Uw - 0.08, 0, None)
            w = P["w"] * (1 + 0.9 * np.clip(-(Uw + 0.02) / 0.15, 0, 1)) \
                * (1 + 0.15 * np.sin(22 * Uw + P["lob"][0]) + 0.1 * np.sin(41 * Uw + P["lob"][1]))
            w = w * np.sqrt(np.clip(1 - ((Uw - uc) / half) ** 4, 0, 1))
            m = (np.abs(Vw - vc) < w) & cavity[win[0], win[1]]
            _paint(tissue, labels, win, m, _T["pancreas"], PANCREAS)
            # lobulation: fat clefts
            _paint(tissue, labels, win, m & (bowel_f[win[0], win[1]] > 1.3), _T["fat"], 0)


def _paint_kidneys(sl: _Slice) -> None:
    """Kidneys: cortex, medulla, sinus, pelvis, hilum notch."""
    (k, t, an, grid, min_size, tissue, labels, B, cavity) = (
        sl.k, sl.t, sl.an, sl.grid, sl.min_size, sl.tissue, sl.labels, sl.B, sl.cavity,
    )
    # --- kidneys: cortex, medullary pyramids, sinus fat + pelvis, hilum notch
    for name, lab in (("kidney_r", KIDNEY_R), ("kidney_l", KIDNEY_L)):
        K = an.extra[name]
        for part, dx in ((name + "_lobe", -K["sep"]), (name + "_lobe", K["sep"]), (name, 0.0)):
            blob = B[part]
            if not blob.present(k, min_size):
                continue
            e = blob.extent(k) * (1 + abs(dx)) + abs(dx) * 0.5 * B[name].a[k]
            win = grid.window(blob.cx[k], blob.cy[k], e, e)
            if win is None:
                continue
            if dx != 0.0:  # lobule offset along the kidney's long axis, in main semi-axes
                shift = dx * B[name].a[k] * 0.55 / (blob.a[k] * max(blob.scale[k], 1e-6))
                f, xl, yl = _blob_field(blob, k, win[2], win[3], dx=shift)
            else:
                f, xl, yl = _blob_field(blob, k, win[2], win[3])
            m = (f < 1.0) & cavity[win[0], win[1]]
            _paint(tissue, labels, win, m, _T["kidney_cortex"], lab)
            phi = np.arctan2(yl, xl)
            med = m & (f > 0.3) & (f < 0.72) & (np.cos(7 * phi) > -0.2)
            _paint(tissue, labels, win, med, _T["kidney_medulla"], None)
            if dx == 0.0:
                s = (t - K["t0"]) / (K["t1"] - K["t0"])
                hil = math.sin(math.pi * min(max((s - 0.3) / 0.45, 0), 1))
                if hil > 0.05:
                    # hilum faces anteromedially: local -y side after rotation
                    g, _, _ = _blob_field(blob, k, win[2], win[3], dx=0.0, dy=-0.75, grow=0.55 * hil)
                    sinus = m & (g < 1.0)
                    _paint(tissue, labels, win, sinus, _T["renal_sinus"], None)
                    g2, _, _ = _blob_field(blob, k, win[2], win[3], dx=0.0, dy=-0.6, grow=0.3 * hil)
                    _paint(tissue, labels, win, m & (g2 < 1.0), _T["renal_pelvis"], None)
                    notch = m & (g < 1.0) & (yl < -0.88)
                    _paint(tissue, labels, win, notch, _T["fat"], 0)


def _paint_muscles(sl: _Slice) -> None:
    """Psoas, paraspinal and quadratus muscles."""
    k, t, an, grid, tissue, labels, rho, body = sl.k, sl.t, sl.an, sl.grid, sl.tissue, sl.labels, sl.rho, sl.body
    # --- muscles: psoas (grow inferiorly), paraspinal, quadratus
    su, sv = an.spine_u[k], an.spine_v[k]
    ps = _ramp(np.array([t]), an.extra["psoas_top"], an.extra["psoas_top"] - 0.35)[0]
    if ps > 0.02:
        for side in (-1, 1):
            cxp, cyp = su + side * (an.spine_a[k] + 0.02 + 0.06 * ps), sv - 0.01 - 0.03 * ps
            rx, ry = 0.025 + 0.075 * ps, 0.025 + 0.055 * ps
            win = grid.window(cxp, cyp, rx, ry)
            if win is not None:
                m = (((win[2] - cxp) / rx) ** 2 + ((win[3] - cyp) / ry) ** 2) < 1
                _paint(tissue, labels, win, m, _T["muscle"], 0)
    for side in (-1, 1):
        cxp, cyp = su + side * 0.16, sv + an.spine_b[k] + 0.13
        rx, ry = 0.125, 0.105
        win = grid.window(cxp, cyp, rx, ry)
        if win is not None:
            m = (((win[2] - cxp) / rx) ** 2 + ((win[3] - cyp) / ry) ** 2) < 1
            m &= body[win[0], win[1]] & (rho[win[0], win[1]] < 0.97)
            _paint(tissue, labels, win, m, _T["muscle"], 0)


def _paint_vessels(sl: _Slice) -> None:
    """IVC, aorta and the iliac vessels."""
    k, t, an, grid, tissue, labels, cavity = sl.k, sl.t, sl.an, sl.grid, sl.tissue, sl.labels, sl.cavity
    sv = an.spine_v[k]
    # --- vessels: IVC (right), aorta (left of midline), iliacs below the bifurcations
    A, I = an.extra["aorta"], an.extra["ivc"]
    if t > I["tb"] and t < I["top"]:
        taper = _ramp(np.array([t]), I["top"], I["top"] - 0.04)[0]
        cx, cy = I["u"][k], sv + I["v"][k] - 0.22
        a, b, th = I["a"][k] * (0.4 + 0.6 * taper), I["b"][k] * (0.4 + 0.6 * taper), I["theta"][k]
        win = grid.window(cx, cy, a + 0.01, a + 0.01)
        if win is not None:
            x, y = win[2] - cx, win[3] - cy
            xl, yl = x * math.cos(th) + y * math.sin(th), -x * math.sin(th) + y * math.cos(th)
            _paint(tissue, labels, win, (xl / a) ** 2 + (yl / b) ** 2 < 1, _T["ivc"], IVC)
    if t > A["tb"]:
        cx, cy, r = A["u"][k], sv + A["v"][k] - 0.2, A["r"][k]
        win = grid.window(cx, cy, r + 0.01, r + 0.01)
        if win is not None:
            _paint(tissue, labels, win, (win[2] - cx) ** 2 + (win[3] - cy) ** 2 < r * r, _T["aorta"], AORTA)
    for tb, cx0, r, tid in ((A["tb"], A["u"][k], 0.045, _T["aorta"]), (I["tb"], I["u"][k] + 0.05, 0.05, _T["iliac_vessel"])):
        if t <= tb:
            d = 0.035 + 1.6 * (tb - t)
            for side in (-1, 1):
                cx = cx0 * 0.3 + side * d
                cy = sv - 0.19 + 0.6 * (tb - t) + (0.05 if tid == _T["iliac_vessel"] else 0.0)
                win = grid.window(cx, cy, r + 0.01, r + 0.01)
                if win is not None:
                    _paint(tissue, labels, win, ((win[2] - cx) ** 2 + (win[3] - cy) ** 2 < r * r) & cavity[win[0], win[1]],
                           tid, 0)


def _paint_vertebra(sl: _Slice) -> None:
    """The vertebra (or disc) of this level with its arch and processes."""
    k, t, an, grid, tissue, labels, rho, body = sl.k, sl.t, sl.an, sl.grid, sl.tissue, sl.labels, sl.rho, sl.body
    su, sv = an.spine_u[k], an.spine_v[k]
    # --- vertebra: body (cortex + cancellous core) or disc, posterior arch, processes
    q = ((t - an.vert_phase) / an.vert_period) % 1.0
    a, b = an.spine_a[k], an.spine_b[k]
    win = grid.window(su, sv + 0.2, 0.32, 0.34)
    if win is not None:
        Uw, Vw = win[2] - su, win[3] - sv
        rb = np.sqrt((Uw / a) ** 2 + (Vw / b) ** 2)
        vb = rb < 1.0
        if q < 0.2:  # intervertebral disc
            _paint(tissue, labels, win, vb, _T["disc"], 0)
        else:
            endplate = q < 0.26 or q > 0.95
            _paint(tissue, labels, win, vb, _T["cortical_bone"], VERTEBRAE)
            _paint(tissue, labels, win, rb < 0.84, _T["endplate" if endplate else "cancellous_bone"], VERTEBRAE)
        cy_c = b + 0.075  # spinal canal centre behind the body
        rc = np.sqrt(Uw ** 2 + (Vw - cy_c) ** 2)
        arch = (rc < 0.1) & (rc >= 0.058) & (Vw > b * 0.6)
        if 0.12 < q < 0.97:
            _paint(tissue, labels, win, arch, _T["cortical_bone"], VERTEBRAE)
            _paint(tissue, labels, win, arch & (rc > 0.07) & (rc < 0.088), _T["cancellous_bone"], VERTEBRAE)
        else:  # disc level: only the facet joints / laminae behind the canal are bone
            _paint(tissue, labels, win, arch & (Vw > cy_c + 0.02), _T["cortical_bone"], VERTEBRAE)
            _paint(tissue, labels, win, arch & (Vw <= cy_c + 0.02), _T["muscle"], 0)
        _paint(tissue, labels, win, rc < 0.058, _T["csf"], 0)
        if 0.3 < q < 0.9:  # spinous process, angled downward: present late in the level
            sp = (np.abs(Uw) < 0.018 + 0.01 * (Vw - cy_c)) & (Vw > cy_c + 0.085) & (Vw < cy_c + 0.24)
            sp &= body[win[0], win[1]] & (rho[win[0], win[1]] < 0.95)
            _paint(tissue, labels, win, sp, _T["cortical_bone"], VERTEBRAE)
        if 0.35 < q < 0.62:  # transverse processes
            tp = (np.abs(Vw - cy_c + 0.01) < 0.022) & (np.abs(Uw) > 0.08) & (np.abs(Uw) < 0.27 - 0.05 * (1 - t))
            _paint(tissue, labels, win, tp, _T["cortical_bone"], VERTEBRAE)


def _paint_ribs(sl: _Slice) -> None:
    """Cross sections of the lower ribs (unlabelled bone)."""
    k, t, an, grid, tissue, labels, inner_fat = sl.k, sl.t, sl.an, sl.grid, sl.tissue, sl.labels, sl.inner_fat
    # --- ribs (unlabelled bone): cross sections along the wall of the upper abdomen
    R = an.extra["ribs"]
    if t > 0.45:
        for i in range(10):
            for side in (-1, 1):
                # angle measured from posterior; ribs reach further anteriorly higher up
                ang = 0.55 + i * 0.21
                # ribs slope down anteriorly: the phase along z advances with the angle, so
                # one slice cuts several ribs and each rib shows up periodically along z
                phase = (t / R["period"] + R["offsets"][int(side > 0)] + 1.3 * ang) % 1.0
                if phase > 0.42 or ang > 0.9 + 3.5 * (t - 0.45):
                    continue
                rr = inner_fat - an.muscle * 0.5
                cx = an.body_cx[k] + side * math.sin(ang) * rr * an.body_a[k]
                bb = an.body_b_post[k] if math.cos(ang) > 0 else an.body_b_ant[k]
                cy = an.body_cy[k] + math.cos(ang) * rr * bb
                win = grid.window(cx, cy, 0.05, 0.05)
                if win is None:
                    continue
                x, y = win[2] - cx, win[3] - cy
                tx, ty = math.cos(ang), -side * math.sin(ang)  # tangential direction
                xl = (x * tx + y * ty) / 0.04
                yl = (-x * ty + y * tx) / 0.016
                rr2 = xl * xl + yl * yl
                _paint(tissue, labels, win, rr2 < 1, _T["cortical_bone"], 0)
                _paint(tissue, labels, win, rr2 < 0.35, _T["rib_marrow"], 0)


#: The painting stages of one slice, in order (each paints over the previous ones).
_STAGES = (_paint_body, _paint_chest, _paint_bowel, _paint_liver_spleen, _paint_stomach_pancreas, _paint_kidneys,
           _paint_muscles, _paint_vessels, _paint_vertebra, _paint_ribs)


def _paint_slice(k: int, an: _Anatomy, grid: _Grid, U: np.ndarray, V: np.ndarray,
                 bowel_f: np.ndarray, vessel_f: np.ndarray, min_size: float, min_px: int):
    """Tissue and label maps of slice ``k``: two (Y, X) uint8 arrays."""
    ny, nx = grid.v.size, grid.u.size
    sl = _Slice(k=k, an=an, grid=grid, U=U, V=V, bowel_f=bowel_f, vessel_f=vessel_f, min_size=min_size,
                tissue=np.zeros((ny, nx), np.uint8), labels=np.zeros((ny, nx), np.uint8))
    for stage in _STAGES:
        stage(sl)
    _remove_specks(sl.tissue, sl.labels, min_px)
    return sl.tissue, sl.labels


def _remove_specks(tissue: np.ndarray, labels: np.ndarray, min_px: int) -> None:
    """Turn organ fragments smaller than ``min_px`` pixels into fat (in place).

    Cutting organs by their neighbours leaves a few slivers of a pixel or two; they are
    not anatomy and would only make the labels noisy. Vertebrae keep every bone piece.
    """
    boxes = ndimage.find_objects(labels)
    for lid, box in enumerate(boxes, start=1):
        if box is None or lid == VERTEBRAE:
            continue
        sub = labels[box] == lid
        cc, n = ndimage.label(sub)
        if n < 2:
            continue
        sizes = np.bincount(cc.ravel())
        small = np.flatnonzero(sizes < min_px)
        small = small[small > 0]
        if small.size:
            kill = np.isin(cc, small)
            labels[box][kill] = 0
            tissue[box][kill] = _T["fat"]
