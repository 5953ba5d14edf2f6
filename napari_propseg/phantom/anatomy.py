"""The per-seed anatomy of one phantom: every organ's centre, size, rotation and shape as a
smooth function of the normalised z coordinate ``t``.

Part of :mod:`napari_propseg.phantom`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .shapes import _VERTEBRA_PERIOD, _envelope, _make_blob, _ramp, _wobble

# ----------------------------------------------------------------------------- anatomy
@dataclass
class _Anatomy:
    """All per-slice parameters of one phantom (arrays are (Z,))."""

    t: np.ndarray
    body_cx: np.ndarray | None = None
    body_cy: np.ndarray | None = None
    body_a: np.ndarray | None = None
    body_b_ant: np.ndarray | None = None
    body_b_post: np.ndarray | None = None
    fat: np.ndarray | None = None
    muscle: float = 0.045
    spine_u: np.ndarray | None = None
    spine_v: np.ndarray | None = None
    spine_a: np.ndarray | None = None
    spine_b: np.ndarray | None = None
    vert_phase: float = 0.0
    vert_period: float = _VERTEBRA_PERIOD
    blobs: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def _build_anatomy(rng: np.random.Generator, t: np.ndarray) -> _Anatomy:
    an = _Anatomy(t=t)
    J = lambda s: rng.normal(0.0, s)  # noqa: E731  (small per-seed jitter)

    # --- body outline: wider and deeper toward the chest, flat back, soft belly
    an.body_cx = _wobble(rng, t, 0.012)
    an.body_cy = 0.03 + _wobble(rng, t, 0.012)
    an.body_a = (0.84 + J(0.03)) * (1 + 0.05 * t + _wobble(rng, t, 0.025))
    an.body_b_ant = (0.56 + J(0.03)) * (1 + 0.06 * _ramp(t, 0.5, 1.0) + _wobble(rng, t, 0.03))
    an.body_b_post = (0.60 + J(0.015)) * (1 + _wobble(rng, t, 0.01))
    an.fat = np.clip(0.11 + J(0.025) + _wobble(rng, t, 0.015), 0.05, 0.2)
    an.muscle = 0.045 + abs(J(0.005))

    # --- spine: vertebral body centre, slight lordosis (more anterior low down)
    an.spine_u = _wobble(rng, t, 0.012, n=2)
    an.spine_v = 0.27 - 0.05 * (1 - t) + J(0.01)
    an.spine_a = (0.125 + J(0.006)) * (1 + 0.18 * (1 - t))
    an.spine_b = (0.105 + J(0.005)) * (1 + 0.12 * (1 - t))
    an.vert_phase = rng.uniform(0, 1)
    an.vert_period = _VERTEBRA_PERIOD * rng.uniform(0.93, 1.07)

    B = an.blobs
    # --- liver: big right lobe (posterolateral tip low, dome high), left lobe crossing
    # the midline anteriorly, whose lower part is a separate piece (ligamentum teres
    # fissure): the liver splits into two components on its lower left-lobe slices.
    lt0, lt1 = 0.40 + J(0.025), 0.99 + J(0.01)
    s = np.clip((t - lt0) / (lt1 - lt0), 0, 1)
    B["liver_r"] = _make_blob(rng, t, cx=-0.44 + 0.14 * s, cy=0.12 - 0.22 * s, a=0.36, b=0.40,
                              theta=-0.35 + 0.3 * s, scale=_envelope(t, lt0, lt1, peak=0.6, power=0.45),
                              harm_amp=0.08)
    llt0, llt1 = lt0 + 0.19 + J(0.02), lt1 - 0.04 + J(0.01)
    s2 = np.clip((t - llt0) / (llt1 - llt0), 0, 1)
    B["liver_l"] = _make_blob(rng, t, cx=0.13 + 0.04 * s2, cy=-0.33 + 0.06 * s2, a=0.27, b=0.13,
                              theta=-0.3, scale=_envelope(t, llt0, llt1, peak=0.7, power=0.5), harm_amp=0.07)
    an.extra["fissure_top"] = llt0 + 0.22 * (llt1 - llt0)
    # --- gallbladder under the liver, anterior-right
    gt0 = lt0 + 0.03 + J(0.015)
    gt1 = gt0 + 0.12 + J(0.01)
    B["gallbladder"] = _make_blob(rng, t, cx=-0.22, cy=-0.3, a=0.065, b=0.1, theta=0.6,
                                  scale=_envelope(t, gt0, gt1, peak=0.35, power=0.5), harm_amp=0.03)
    # --- spleen: posterolateral left crescent
    st0, st1 = 0.60 + J(0.03), 0.90 + J(0.02)
    s3 = np.clip((t - st0) / (st1 - st0), 0, 1)
    B["spleen"] = _make_blob(rng, t, cx=0.54 - 0.03 * s3, cy=0.22 - 0.14 * s3, a=0.16, b=0.27, theta=0.6,
                             scale=_envelope(t, st0, st1, peak=0.5, power=0.5), harm_amp=0.06)
    # --- stomach: fundus/body high on the left, antrum lower crossing to the right
    sb0, sb1 = 0.64 + J(0.02), 0.92 + J(0.015)
    s4 = np.clip((t - sb0) / (sb1 - sb0), 0, 1)
    B["stomach_body"] = _make_blob(rng, t, cx=0.30 - 0.04 * s4, cy=-0.18 + 0.12 * s4, a=0.19, b=0.16, theta=0.4,
                                   scale=_envelope(t, sb0, sb1, peak=0.45, power=0.5), harm_amp=0.07)
    sa0, sa1 = sb0 - 0.1 + J(0.015), sb0 + 0.05
    s5 = np.clip((t - sa0) / (sa1 - sa0), 0, 1)
    B["stomach_antrum"] = _make_blob(rng, t, cx=-0.02 + 0.2 * s5, cy=-0.36 + 0.05 * s5, a=0.14, b=0.065,
                                     theta=-0.15, scale=_envelope(t, sa0, sa1, peak=0.5, power=0.5), harm_amp=0.04)
    an.extra["gas_frac"] = rng.uniform(0.2, 0.45)  # fraction of the lumen depth filled with gas
    # --- pancreas: oblique band, head low near the IVC, tail high near the spleen
    pt0 = 0.50 + J(0.02)
    pt1 = pt0 + 0.14 + J(0.01)
    an.extra["pancreas"] = dict(t0=pt0, t1=pt1, dv=J(0.02), bend=0.55 + J(0.08), w=0.045 + abs(J(0.006)),
                                wob=_wobble(rng, t, 0.015), lob=rng.uniform(0, 2 * np.pi, 2))
    # --- kidneys: right lower than left; poles split into two lobules
    for name, side, k0 in (("kidney_r", -1, 0.22), ("kidney_l", 1, 0.28)):
        t0 = k0 + J(0.025)
        t1 = t0 + 0.37 + J(0.02)
        sk = np.clip((t - t0) / (t1 - t0), 0, 1)
        kw = dict(cx=side * (0.37 + 0.04 * (1 - sk)), cy=0.21 - 0.03 * (1 - sk), a=0.18, b=0.12,
                  theta=side * (-0.75 - 0.2 * (1 - sk)), harm_amp=0.03, wob_c=0.008)
        split_len = 0.08 + rng.uniform(0.0, 0.04)
        main0 = t0 + split_len * (t1 - t0)
        B[name] = _make_blob(rng, t, scale=_envelope(t, main0, t1, peak=0.5, power=0.5), **kw)
        lob = _envelope(t, t0, t0 + 3.2 * split_len * (t1 - t0), peak=0.45, power=0.5)
        B[name + "_lobe"] = _make_blob(rng, t, scale=lob, **{**kw, "a": 0.08, "b": 0.085, "harm_amp": 0.02})
        an.extra[name] = dict(t0=t0, t1=t1, side=side, sep=rng.uniform(0.95, 1.15))
    # --- psoas: appear mid-abdomen, grow inferiorly
    an.extra["psoas_top"] = 0.55 + J(0.02)
    # --- vessels
    tb = 0.12 + J(0.02)
    an.extra["aorta"] = dict(tb=tb, u=0.065 + J(0.01) + _wobble(rng, t, 0.02, n=2),
                             v=-0.055 + J(0.01) + _wobble(rng, t, 0.01, n=2) + 0.08 * _ramp(t, 0.8, 1.0),
                             r=(0.066 + J(0.004)) * (0.88 + 0.12 * t))
    an.extra["ivc"] = dict(tb=tb - 0.04, top=lt1 - 0.05 + J(0.01),
                           u=-0.13 + J(0.01) + _wobble(rng, t, 0.02, n=2) + 0.03 * _ramp(t, 0.75, 0.95),
                           v=-0.04 + J(0.01) + _wobble(rng, t, 0.01, n=2) - 0.11 * _ramp(t, 0.68, 0.92),
                           a=0.085 * (1 + _wobble(rng, t, 0.12)), b=0.052 * (1 + _wobble(rng, t, 0.2)),
                           theta=0.2 + _wobble(rng, t, 0.2))
    # --- lungs: posterior recesses first, growing toward the top slice
    lu0 = 0.80 + J(0.02)
    for name, side in (("lung_r", -1), ("lung_l", 1)):
        sl = np.clip((t - lu0) / (1.0 - lu0), 0, 1)
        B[name] = _make_blob(rng, t, cx=side * (0.42 - 0.05 * sl), cy=0.3 - 0.3 * sl, a=0.42, b=0.45,
                             theta=side * 0.4, scale=_ramp(t, lu0, lu0 + 0.17) * (t > lu0), harm_amp=0.05)
    # --- heart: apex and ventricles appear above the dome, anterior and left of midline
    he0 = 0.90 + J(0.015)
    B["heart"] = _make_blob(rng, t, cx=0.1, cy=-0.2, a=0.3, b=0.22, theta=0.5,
                            scale=_envelope(t, he0, he0 + 0.35, peak=0.5, power=0.5), harm_amp=0.04)
    # --- colon: ascending (right) and descending (left) with gas, lower abdomen
    for name, side in (("colon_r", -1), ("colon_l", 1)):
        ct0 = 0.0
        ct1 = (0.55 if side < 0 else 0.72) + J(0.03)
        B[name] = _make_blob(rng, t, cx=side * 0.55, cy=-0.05 + 0.05 * side, a=0.1, b=0.09,
                             scale=_envelope(t, ct0 - 0.3, ct1, peak=0.7, power=0.3), harm_amp=0.1)
    an.extra["bowel_top"] = 0.64 + J(0.02)
    # --- ribs: angles (from the lateral direction) of the lower ribs' cross sections
    an.extra["ribs"] = dict(offsets=rng.uniform(0, 1, 2), period=0.115 + J(0.006))
    return an
