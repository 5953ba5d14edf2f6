"""How the STCN engine turns the network's passes into labels, segment by segment.

* **Between two anchors** ``a < b`` the labels are propagated from ``a`` upward and from
  ``b`` downward; the two passes' class probabilities are fused per slice with linear
  weights favouring the nearer anchor, ``w_a = (b - z) / (b - a)``, ``w_b = 1 - w_a``.
  Each pass carries the labels of its own anchor (a label missing there has probability
  0 in that pass; an anchor without labels gives pure background).

  - **Image-guided** (default, :func:`guided_gap`): per pixel ``argmax_c log prior_c +
    a log p(HU | c) + n log max(p_net_c, 0.05)`` at full resolution (:mod:`.appearance`),
    the network's term left out near objects too small for the 1/16 memory.
  - **Linear SDF prior** (``appearance`` weight fixed at 0 with ``prior="sdf"``, or
    ``prior="none"``; ablations and tests, :func:`linear_gap`): ``p = (1 - a) p_net + a
    p_sdf`` at working resolution, upsampled bilinearly before the arg-max.

* **Beyond the outermost anchors** (:func:`outward`) the labels of that anchor are
  propagated outward until every label stopped; the confidence falls from 1 next to the
  anchor to 0.5 on the farthest slice still holding propagated labels.

Locked labels are never written: their voxels are kept as in the input on every slice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..crop import BodyCrop
from ..preprocess import resize_slices
from ..progress import check_cancel, report
from . import appearance as app
from .appearance import LOGLIK_SPAN, AppearanceOptions, GapAppearance, tau_pixels
from .gap import GuidedGap
from .interp import _bracket_sdf, anchor_disagreement, gap_confidence
from .options import NETWORK_WEIGHT
from .stcn_passes import StcnPasses, channel_argmax, dequantize, expand, tick_through

#: Stride of the memory (keys and values) relative to the network's working resolution.
MEMORY_STRIDE = 16
#: The network's probabilities are floored here before the log (it cannot veto a class alone).
NETWORK_FLOOR = 0.05
#: Within this many full-resolution pixels of a small object's blended contour, every class
#: follows the SDF prior alone (see :func:`prior_map`).
SMALL_OBJECT_MARGIN_PX = 2.0


@dataclass(frozen=True)
class FusionSettings:
    """The engine's fusion options (see :class:`~.engine.PropagationEngine`)."""

    prior: str = "sdf"
    prior_weight: float = 0.7
    prior_small_cells: float = 4.0
    network_weight: float = NETWORK_WEIGHT


@dataclass
class Canvas:
    """What a fill reads and writes: the input labels, the locked ids, the output volume and
    the per-slice confidence (both written in place)."""

    labels: np.ndarray
    locked: np.ndarray
    out: np.ndarray
    conf: np.ndarray

    def place(self, z: int, idx: torch.Tensor, objects: Sequence[int], crop: BodyCrop) -> None:
        """Class indices (body crop, 0 = background, i = ``objects[i - 1]``) into slice z of
        ``out``: label ids, background outside the crop, locked voxels kept."""
        lut = torch.as_tensor([0] + list(objects), dtype=torch.int64, device=idx.device)
        lab = crop.place(lut[idx].cpu().numpy().astype(self.labels.dtype), self.labels.shape[1:], self.labels.dtype)
        if self.locked.size:
            keep = np.isin(self.labels[z], self.locked)
            lab[keep] = self.labels[z][keep]
        self.out[z] = lab


@dataclass
class GapPasses:
    """The two passes across one gap ``(a, b)``: 8-bit outputs per slice (popped as used)
    and the objects each carried; None when no pass ran (the network is not listened to)."""

    a: int
    b: int
    objects: list[int]
    up: dict | None
    up_objects: list[int]
    down: dict | None
    down_objects: list[int]

    def fused(self, z: int, wa: float, size: int, device) -> torch.Tensor:
        """(K+1, R, R) ``wa * p_up + (1 - wa) * p_down`` at slice z."""
        pu = expand(self.up.pop(z), self.up_objects, self.objects, size, device)
        pd = expand(self.down.pop(z), self.down_objects, self.objects, size, device)
        return wa * pu + (1.0 - wa) * pd


class StcnFusion:
    """Labels of the segments of one (re)propagation from the network's passes.

    Args:
        passes: the network's passes and caches.
        volume_hu: (Z, Y, X) HU.
        spacing: (sz, sy, sx) mm.
        settings: :class:`FusionSettings`.
    """

    def __init__(self, passes: StcnPasses, volume_hu: np.ndarray, spacing: Sequence[float], settings: FusionSettings) -> None:
        self.passes = passes
        self.volume_hu = volume_hu
        self.spacing = tuple(spacing)
        self.settings = settings

    @property
    def crop(self) -> BodyCrop:
        return self.passes.crop

    @property
    def device(self):
        return self.passes.device

    def run(self, labels, segs, locked, out, progress, cancel, *, guided: bool,
            gap_options: Callable[[int, int], AppearanceOptions]) -> np.ndarray:
        """Fill the slices of ``segs`` into ``out``; returns the (Z,) confidence (NaN elsewhere).

        ``guided``: the image-guided fusion between anchors; ``gap_options(a, b)``: its
        options (the image weight in use) for the gap ``(a, b)``."""
        canvas = Canvas(labels, locked, out, np.full(labels.shape[0], np.nan, dtype=np.float32))
        total = sum(len(s.slices) * (2 if s.kind == "between" else 1) for s in segs)
        done = [0]

        def tick(z: int) -> None:
            done[0] += 1
            report(progress, done[0], total, f"propagating slice {z}")

        with torch.inference_mode():
            for seg in segs:
                zs = seg.slices
                ends = [a for a in (seg.lo, seg.hi) if a is not None]
                ids = np.unique(np.concatenate([np.unique(labels[a]) for a in ends]))
                objects = [int(i) for i in ids if i != 0 and i not in locked]
                if not objects:
                    for z in zs:
                        check_cancel(cancel)
                        out[z] = np.where(np.isin(labels[z], locked), labels[z], 0)
                        canvas.conf[z] = 1.0
                        for _ in range(2 if seg.kind == "between" else 1):
                            tick(z)
                elif seg.kind == "between":
                    gap = self._gap_passes(seg, zs, objects, canvas, guided, tick, cancel)
                    if guided:
                        self.guided_gap(gap, zs, canvas, gap_options(seg.lo, seg.hi))
                    else:
                        self.linear_gap(gap, zs, canvas)
                else:
                    self.outward(seg, zs, objects, canvas, tick, cancel)
        return canvas.conf

    def _gap_passes(self, seg, zs, objects, canvas: Canvas, guided: bool, tick, cancel) -> GapPasses:
        if guided and self.settings.network_weight == 0:  # the network would not be listened to: run no pass
            tick_through(zs + zs, tick, cancel)
            return GapPasses(seg.lo, seg.hi, objects, None, [], None, [])
        labels, locked = canvas.labels, canvas.locked
        up, up_objects = self.passes.cached_pass(seg.lo, labels, locked, zs, stop=False, tick=tick, cancel=cancel)
        down, down_objects = self.passes.cached_pass(seg.hi, labels, locked, zs[::-1], stop=False, tick=tick, cancel=cancel)
        return GapPasses(seg.lo, seg.hi, objects, up, up_objects, down, down_objects)

    def guided_gap(self, gap: GapPasses, zs: Sequence[int], canvas: Canvas, opt: AppearanceOptions) -> None:
        """Fill a gap with the image-guided fusion at full resolution (body crop):
        ``argmax log prior_SDF + a * log p(HU | class) + n * log max(p_net, floor)`` with
        ``a`` = ``opt.weight``, ``n`` = ``network_weight``: the gap fill of ``interp``
        (:class:`~.gap.GuidedGap`) with the network's term added.

        The network's term is left out (0) near objects smaller than
        ``prior_small_cells`` memory cells on both anchors: its 1/16 memory cannot hold
        them, so it may not vote them away."""
        labels, objects, crop = canvas.labels, gap.objects, self.crop
        r = self.passes.resolution
        a, b = gap.a, gap.b
        ca, cb = crop.crop(labels[a], 0), crop.crop(labels[b], 0)
        ia, ib = crop.crop(self.volume_hu[a], -1000.0), crop.crop(self.volume_hu[b], -1000.0)
        model = GapAppearance(ia, ib, ca, cb, objects, 0.5 * (self.spacing[1] + self.spacing[2]), opt)
        nw = self.settings.network_weight
        _, small = self.prior_weights(labels[a], labels[b], objects)
        small_ids = [i for i, sm in zip(objects, small.tolist()) if sm]
        sa = sb = None
        if nw > 0 and small_ids:  # where the network's term is left out: near the small objects
            sa, sb = (torch.from_numpy(x).to(self.device) for x in self.crop_sdf(labels[a], labels[b], small_ids))
        # the network's term spreads the classes by at most n ln(1 / floor): each label's reach grows by that
        span = LOGLIK_SPAN * opt.weight + (nw * math.log(1.0 / NETWORK_FLOOR) if nw > 0 else 0.0)
        fill = GuidedGap(ca, cb, objects, span, tau_pixels(opt, a + (b - a) // 2, a, b, self.spacing), crop=app.CROP_TO_REACH)
        y0, y1, x0, x1 = fill.union
        disagree = anchor_disagreement(labels[a], labels[b], objects)
        size = tuple(ca.shape)
        for z in zs:
            wa = (b - z) / (b - a)
            extra = None
            if nw > 0:
                pn = F.interpolate(gap.fused(z, wa, r, self.device).unsqueeze(0), size=size, mode="bilinear", align_corners=False)[0]
                ex = nw * torch.log(pn.clamp_min(NETWORK_FLOOR))
                if sa is not None:
                    near = ((wa * sa + (1.0 - wa) * sb) < SMALL_OBJECT_MARGIN_PX).any(dim=0, keepdim=True)
                    ex = torch.where(near, torch.zeros_like(ex), ex)
                extra = ex.cpu().numpy()
            idx = np.zeros(size, np.int64)
            if y1 > y0 and x1 > x0:
                idx[y0:y1, x0:x1] = fill.fill(wa, tau_pixels(opt, z, a, b, self.spacing), crop.crop(self.volume_hu[z], -1000.0),
                                              model.log_table(wa), [opt.weight], extra)[0]
            canvas.place(z, torch.from_numpy(idx), objects, crop)
            canvas.conf[z] = gap_confidence(wa, disagree)

    def linear_gap(self, gap: GapPasses, zs: Sequence[int], canvas: Canvas) -> None:
        """Fill a gap with the two passes' fused probabilities, blended with the linear SDF
        prior when ``prior="sdf"`` and ``prior_weight > 0`` (working resolution)."""
        labels, objects = canvas.labels, gap.objects
        a, b = gap.a, gap.b
        s = self.settings
        r = self.passes.resolution
        sdf = self.anchor_sdf(labels[a], labels[b], objects) if s.prior == "sdf" and s.prior_weight > 0 else None
        prior_w, small = self.prior_weights(labels[a], labels[b], objects) if sdf is not None else (None, None)
        disagree = anchor_disagreement(labels[a], labels[b], objects)
        for z in zs:
            wa = (b - z) / (b - a)
            p = gap.fused(z, wa, r, self.device)
            canvas.conf[z] = gap_confidence(wa, disagree)
            if sdf is not None:
                d = wa * sdf[0] + (1.0 - wa) * sdf[1]  # blended signed distances, K, R, R
                w = prior_map(prior_w, small, d)
                p = (1.0 - w) * p + w * sdf_probs(d)
                p = p / p.sum(dim=0, keepdim=True).clamp_min(1e-6)
            self.finish(z, p, objects, canvas)

    def outward(self, seg, zs: Sequence[int], objects: Sequence[int], canvas: Canvas, tick, cancel) -> None:
        """Propagate the outermost anchor's labels outward (``below`` / ``above``)."""
        start = seg.hi if seg.kind == "below" else seg.lo
        order = zs[::-1] if seg.kind == "below" else zs
        probs, _ = self.passes.cached_pass(start, canvas.labels, canvas.locked, order, stop=True, tick=tick, cancel=cancel)
        out, locked, conf = canvas.out, canvas.locked, canvas.conf
        carried = []
        for z in order:
            self.finish(z, dequantize(probs.pop(z)), objects, canvas)
            conf[z] = 1.0
            if np.any((out[z] != 0) & ~np.isin(out[z], locked)):
                carried.append(z)
        if carried:  # doubt grows toward where the labels stop: 0.5 on the farthest carried slice
            reach = max(abs(z - start) for z in carried)
            for z in carried:
                conf[z] = 1.0 - 0.5 * abs(z - start) / reach

    def finish(self, z: int, p: torch.Tensor, objects: Sequence[int], canvas: Canvas) -> None:
        """Upsample fused (K+1, R, R) probabilities, arg-max into label ids, keep locked voxels."""
        full = F.interpolate(p.unsqueeze(0), size=self.crop.size(canvas.labels.shape[1:]), mode="bilinear", align_corners=False)[0]
        canvas.place(z, channel_argmax(full), objects, self.crop)

    def prior_weights(self, lab_a: np.ndarray, lab_b: np.ndarray, objects: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(K+1, 1, 1) weights of the SDF prior per channel: ``prior_weight``, except 1 for
        the objects smaller than ``prior_small_cells`` memory cells on both anchors; and
        (K,) bool, which objects those are (see :func:`prior_map` for how they are used).

        The memory keys and values live at 1/16 of the working resolution; an object that
        covers fewer than a few of those cells cannot be read out of the memory, so the
        prior carries it alone. Area in cells: full-resolution pixels (body crop) scaled by
        ``(R / 16)^2 / (h w)``.
        """
        s = self.settings
        ca, cb = self.crop.crop(lab_a, 0), self.crop.crop(lab_b, 0)
        cell = (self.passes.resolution / MEMORY_STRIDE) ** 2 / float(ca.size)
        small = [max(int(np.count_nonzero(ca == i)), int(np.count_nonzero(cb == i))) * cell < s.prior_small_cells for i in objects]
        w = [s.prior_weight] + [1.0 if sm else s.prior_weight for sm in small]
        return (torch.tensor(w, dtype=torch.float32, device=self.device)[:, None, None],
                torch.tensor(small, dtype=torch.bool, device=self.device))

    def anchor_sdf(self, lab_a: np.ndarray, lab_b: np.ndarray, objects: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Signed distances of each object on two bracketing anchors at working resolution:
        :meth:`crop_sdf` (full resolution, so small organs keep their shape) resized
        bilinearly to ``R x R``; distances stay in full-resolution pixels. (K, R, R) each."""
        r = self.passes.resolution
        return tuple(resize_slices(torch.from_numpy(x).to(self.device), (r, r), mode="bilinear")
                     for x in self.crop_sdf(lab_a, lab_b, objects))

    def crop_sdf(self, lab_a: np.ndarray, lab_b: np.ndarray, objects: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(K, h, w) float32 signed distances of each object on two bracketing anchors, on
        the full-resolution body crop. An object missing on one anchor shrinks to nothing
        there (as in :func:`~.interp.sdf_interpolate`); one outside the crop on both is
        everywhere outside (the crop's diagonal)."""
        ca, cb = self.crop.crop(lab_a, 0), self.crop.crop(lab_b, 0)
        far = float(np.hypot(*ca.shape))
        da, db = [], []
        for i in objects:
            ma, mb = ca == i, cb == i
            if ma.any() or mb.any():
                a, b = _bracket_sdf(ma, mb)
            else:
                a = b = np.full(ca.shape, far, dtype=np.float32)
            da.append(a)
            db.append(b)
        return np.stack(da).astype(np.float32), np.stack(db).astype(np.float32)


def prior_map(weights: torch.Tensor, small: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per-class, per-pixel weight of the SDF prior, (K+1, R, R).

    ``weights`` (K+1, 1, 1) and ``small`` (K,) bool from :meth:`StcnFusion.prior_weights`:
    1 for small objects (the network cannot hold them, so it never adds to their class),
    else ``prior_weight``; ``d`` (K, R, R) the blended signed distances. Near a small object
    (blended signed distance under :data:`SMALL_OBJECT_MARGIN_PX`) every class takes weight
    1, so the network's votes for background or a neighbouring organ do not erode the
    object there either (the adrenal glands of the held-out CT need it).
    """
    if not bool(small.any()):
        return weights
    near = (d[small] < SMALL_OBJECT_MARGIN_PX).any(dim=0, keepdim=True)  # 1, R, R
    return torch.where(near, torch.ones_like(weights), weights)


def sdf_probs(d: torch.Tensor) -> torch.Tensor:
    """(K+1, R, R) class probabilities of the blended signed distances ``d`` (K, R, R),
    ``wa * da + (1 - wa) * db``.

    Per object ``q_l = sigmoid(-d_l)`` (d in pixels, negative inside); background
    ``prod_l (1 - q_l)``; the K+1 channels are normalised to sum 1.
    """
    q = torch.sigmoid(-d)  # K, R, R
    bg = torch.prod(1.0 - q, dim=0, keepdim=True)
    p = torch.cat([bg, q], dim=0)
    return p / p.sum(dim=0, keepdim=True).clamp_min(1e-6)
