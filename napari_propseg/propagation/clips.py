"""Training clips of the STCN propagation network, drawn from preprocessed volumes.

Shared by training (:mod:`napari_propseg.training.data` builds the volumes and the
cache) and online adaptation (:mod:`.adapt` draws clips from one volume's anchors), so
inference needs nothing from training.

:class:`ClipDataset` draws sample ``i`` from a numpy Generator seeded with ``(seed, i)``,
so any worker count, any rank and any resume point gives the same samples.
Stage 0 (static): one slice becomes a 3-frame clip through 3 independent random affine +
elastic deformations; the objects are label masks or SLIC superpixels of the slice.
Stage 1: 3 axial slices of one volume, consecutive frames ``d`` slices apart with ``d``
drawn uniformly from ``[1, max_gap]``; ``max_gap`` follows the curriculum (seed
pipeline: 3, 4, 5, 7, 3 switching at 10/20/30/40/90 % of stage 1) and is counted in
slices of ``gap_reference_mm`` thickness (default 3 mm): a 2 mm volume gets
``round(gap * 3 / 2)`` slices, so the anatomy moves about as much between frames
whatever the slice thickness (``gap_reference_mm: null`` counts raw slices).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: Default curriculum of stage 1: maximum gaps and the fractions of stage 1 where they start.
DEFAULT_GAPS = (3, 4, 5, 7, 3)
DEFAULT_GAP_SWITCH = (0.1, 0.2, 0.3, 0.4, 0.9)


# --------------------------------------------------------------------------- volumes


@dataclass
class CaseData:
    """One preprocessed volume at the working resolution.

    Attributes:
        name: short name (file name or ``phantom_<seed>``).
        image: (Z, 3, R, R) float16 windowed CT in [0, 1].
        labels: (Z, R, R) uint8 FLARE ids.
        spacing: (sz, sy, sx) mm of the resized grid.
        kind: ``"real"`` or ``"phantom"``.
        hu: (Z, R, R) int16 HU after cropping and resizing (what the cache stores;
            ``image`` is its windowing), or None.
    """

    name: str
    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    kind: str = "real"
    hu: np.ndarray | None = None

    @property
    def depth(self) -> int:
        return int(self.image.shape[0])


@dataclass
class TrainingData:
    """Everything the trainer reads: training cases, phantoms, validation cases."""

    resolution: int
    cases: list[CaseData] = field(default_factory=list)
    phantoms: list[CaseData] = field(default_factory=list)
    validation: list[CaseData] = field(default_factory=list)
    phantom_ratio: float = 0.0
    crop: str = "body"

    def summary(self) -> str:
        def names(cs):
            return ", ".join(f"{c.name} {c.image.shape[0]}sl" for c in cs) or "none"

        return (f"resolution {self.resolution}; train: {names(self.cases)}; phantoms: {len(self.phantoms)} "
                f"(ratio {self.phantom_ratio:g}); validation: {names(self.validation)}")


# --------------------------------------------------------------------------- geometry helpers


def _random_affine(rng: np.random.Generator, *, rot_deg: float, scale: tuple[float, float], shear_deg: float, translate: float, flip: bool) -> torch.Tensor:
    """(2, 3) affine in normalised coordinates mapping output to input positions."""
    a = math.radians(rng.uniform(-rot_deg, rot_deg))
    sh = math.radians(rng.uniform(-shear_deg, shear_deg))
    s = math.exp(rng.uniform(math.log(scale[0]), math.log(scale[1])))
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    shear = np.array([[1.0, math.tan(sh)], [0.0, 1.0]])
    m = rot @ shear / s
    if flip:
        fx = -1.0 if rng.random() < 0.5 else 1.0
        fy = -1.0 if rng.random() < 0.5 else 1.0
        m = m @ np.diag([fx, fy])
    t = rng.uniform(-translate, translate, size=2)
    return torch.tensor(np.concatenate([m, t[:, None]], axis=1), dtype=torch.float32)


def _elastic_field(rng: np.random.Generator, size: int, *, alpha: float, grid: int = 5) -> torch.Tensor:
    """(1, size, size, 2) smooth random displacement in normalised coordinates."""
    coarse = torch.from_numpy(rng.normal(0.0, alpha, size=(1, 2, grid, grid)).astype(np.float32))
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)


def warp(image: torch.Tensor, masks: torch.Tensor, theta: torch.Tensor, disp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply an affine (+ displacement) to an image and its masks.

    Args:
        image: (C, H, W) float32.
        masks: (K, H, W) float32 0/1.
        theta: (2, 3) affine (output -> input, normalised coordinates).
        disp: (1, H, W, 2) extra displacement or None.

    Returns:
        ``(image, masks)`` of the same shapes; masks re-binarised at 0.5.
    """
    h, w = image.shape[-2:]
    g = F.affine_grid(theta[None], [1, 1, h, w], align_corners=False)
    if disp is not None:
        g = g + disp
    img = F.grid_sample(image[None], g, mode="bilinear", padding_mode="border", align_corners=False)[0]
    if masks.shape[0]:
        m = F.grid_sample(masks[None], g, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        m = (m > 0.5).float()
    else:
        m = masks
    return img, m


# --------------------------------------------------------------------------- dataset


class ClipDataset(torch.utils.data.Dataset):
    """Training clips for both stages, sample ``i`` drawn from ``default_rng((seed, i))``.

    The global sample index encodes the optimisation step (``i // global_batch``), which
    picks the stage (``step < stage0_steps``: static clips) and the stage-1 gap.

    Args:
        data: preprocessed volumes.
        config: the training config's ``clips`` options merged with ``seed``,
            ``num_frames``, ``num_objects`` (see :data:`CLIP_DEFAULTS`).
        stage0_steps, stage1_steps: step counts of the stages.
        global_batch: samples per step over all ranks.

    Each item is a dict:
        ``frames`` (T, 3, R, R) float32, ``masks`` (T, K, R, R) float32 0/1 (``masks[0]``
        is the first-frame input), ``target`` (T, R, R) int64 ids 0..K, ``num_objects``
        int64, ``stage`` int64, ``gap`` int64 (max gap used; 0 in stage 0).
    """

    def __init__(self, data: TrainingData, config: Mapping[str, Any], *, stage0_steps: int, stage1_steps: int, global_batch: int):
        self.data = data
        self.cfg = {**CLIP_DEFAULTS, **dict(config)}
        self.stage0_steps = int(stage0_steps)
        self.stage1_steps = int(stage1_steps)
        self.global_batch = int(global_batch)
        self.res = data.resolution
        self.num_frames = int(self.cfg["num_frames"])
        self.k = int(self.cfg["num_objects"])
        self.min_area = max(4, int(self.cfg["min_area_fraction"] * self.res * self.res))
        # slices that show at least one labelled organ, per case
        self._fg = {id(c): np.nonzero(c.labels.reshape(c.depth, -1).max(1) > 0)[0] for c in data.cases + data.phantoms}

    def __len__(self) -> int:
        return (self.stage0_steps + self.stage1_steps) * self.global_batch

    # -- scheduling
    def max_gap(self, step: int) -> int:
        """Stage-1 maximum gap (in reference slices) at optimisation ``step``."""
        gaps = list(self.cfg["gaps"])
        switch = list(self.cfg["gap_switch"])
        frac = (step - self.stage0_steps) / max(1, self.stage1_steps)
        g = gaps[0]
        for gi, si in zip(gaps, switch):
            if frac >= si:
                g = gi
        return int(g)

    def _pick_case(self, rng: np.random.Generator) -> CaseData:
        use_ph = self.data.phantoms and (not self.data.cases or rng.random() < self.data.phantom_ratio)
        pool = self.data.phantoms if use_ph else self.data.cases
        return pool[int(rng.integers(len(pool)))]

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng((int(self.cfg["seed"]), int(index)))
        step = int(index) // self.global_batch
        for _ in range(20):
            item = self._static(rng) if step < self.stage0_steps else self._clip(rng, self.max_gap(step))
            if item is not None:
                item["stage"] = torch.tensor(0 if step < self.stage0_steps else 1)
                return item
        raise RuntimeError("could not draw a training clip with a visible object in 20 tries; check the training labels")

    # -- objects
    def _pack(self, frames: torch.Tensor, masks: torch.Tensor, gap: int) -> dict:
        """frames (T,3,R,R), masks (T,n,R,R) with n <= K -> padded item dict."""
        t, n = masks.shape[:2]
        full = torch.zeros((t, self.k, self.res, self.res), dtype=torch.float32)
        full[:, :n] = masks
        target = torch.zeros((t, self.res, self.res), dtype=torch.int64)
        for j in range(n):  # later objects win on overlap (none with exclusive labels)
            target[masks[:, j] > 0.5] = j + 1
        return {"frames": frames.float(), "masks": full, "target": target, "num_objects": torch.tensor(n), "gap": torch.tensor(gap)}

    def _choose_ids(self, rng: np.random.Generator, ids: Sequence[int]) -> list[int]:
        ids = list(ids)
        n = 2 if (self.k >= 2 and len(ids) >= 2 and rng.random() < self.cfg["two_object_prob"]) else 1
        return [int(v) for v in rng.choice(ids, size=n, replace=False)]

    def _present(self, lab: np.ndarray) -> list[int]:
        ids, counts = np.unique(lab, return_counts=True)
        return [int(i) for i, c in zip(ids, counts) if i != 0 and c >= self.min_area]

    def _superpixels(self, rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
        """(R, R) int region ids (0 = outside the body) from SLIC on the abdomen window."""
        from skimage.segmentation import slic

        body = img[1] > 0.3  # chest window: air is ~0.22, soft tissue ~0.85
        n_seg = int(rng.integers(self.cfg["superpixels"][0], self.cfg["superpixels"][1] + 1))
        seg = slic(img[0].astype(np.float64), n_segments=n_seg, compactness=float(self.cfg["slic_compactness"]),
                   channel_axis=None, start_label=1, mask=body if body.sum() > self.min_area else None)
        return seg.astype(np.int32)

    # -- stage 0
    def _static(self, rng: np.random.Generator) -> dict | None:
        case = self._pick_case(rng)
        use_labels = rng.random() < self.cfg["static_label_prob"]
        fg = self._fg[id(case)]
        if use_labels and len(fg):
            z = int(fg[rng.integers(len(fg))])
        else:
            z = int(rng.integers(case.depth))
        img = case.image[z].astype(np.float32)
        regions = case.labels[z] if use_labels else None
        ids = self._present(regions) if regions is not None else []
        if not ids:
            regions = self._superpixels(rng, img)
            ids = self._present(regions)
            if not ids:
                return None
        chosen = self._choose_ids(rng, ids)
        base_img = torch.from_numpy(img)
        base_masks = torch.from_numpy(np.stack([regions == v for v in chosen]).astype(np.float32))
        frames, masks = [], []
        c = self.cfg
        for _ in range(self.num_frames):
            theta = _random_affine(rng, rot_deg=c["static_rotation"], scale=tuple(c["static_scale"]), shear_deg=c["static_shear"],
                                   translate=c["static_translate"], flip=False)
            disp = _elastic_field(rng, self.res, alpha=c["elastic_alpha"])
            fi, mi = warp(base_img, base_masks, theta, disp)
            frames.append(fi)
            masks.append(mi)
        masks_t = torch.stack(masks)
        if masks_t[0].flatten(1).sum(1).min() < self.min_area // 2:
            return None
        return self._pack(self._intensity(rng, torch.stack(frames)), masks_t, 0)

    # -- stage 1
    def _clip(self, rng: np.random.Generator, max_gap: int) -> dict | None:
        case = self._pick_case(rng)
        ref = self.cfg["gap_reference_mm"]
        g = max_gap if not ref else max(1, int(round(max_gap * float(ref) / case.spacing[0])))
        g = max(1, min(g, (case.depth - 1) // (self.num_frames - 1)))
        if case.depth < self.num_frames:
            return None
        fg = self._fg[id(case)]
        steps = rng.integers(1, g + 1, size=self.num_frames - 1)
        span = int(steps.sum())
        starts = fg[fg + span < case.depth] if len(fg) else fg
        reverse = rng.random() < 0.5
        if reverse:
            starts = fg[fg - span >= 0] - span if len(fg) else fg
        if not len(starts):
            return None
        z0 = int(starts[rng.integers(len(starts))])
        idx = [z0] + list(z0 + np.cumsum(steps))
        if reverse:
            idx = idx[::-1]
        labs = case.labels[idx]
        ids = self._present(labs[0])
        if not ids:
            return None
        chosen = self._choose_ids(rng, ids)
        frames = torch.from_numpy(case.image[idx].astype(np.float32))
        masks = torch.from_numpy(np.stack([labs == v for v in chosen], axis=1).astype(np.float32))  # T, n, R, R
        c = self.cfg
        theta = _random_affine(rng, rot_deg=c["clip_rotation"], scale=tuple(c["clip_scale"]), shear_deg=0.0, translate=c["clip_translate"], flip=True)
        out_f, out_m = [], []
        for t in range(self.num_frames):
            fi, mi = warp(frames[t], masks[t], theta)
            out_f.append(fi)
            out_m.append(mi)
        masks_t = torch.stack(out_m)
        if masks_t[0].flatten(1).sum(1).min() < self.min_area // 2:
            return None
        return self._pack(self._intensity(rng, torch.stack(out_f)), masks_t, g)

    def _intensity(self, rng: np.random.Generator, frames: torch.Tensor) -> torch.Tensor:
        """Same random contrast/brightness on all frames of a clip, clipped to [0, 1]."""
        j = float(self.cfg["intensity_jitter"])
        if j <= 0:
            return frames
        a = 1.0 + rng.uniform(-j, j)
        b = rng.uniform(-j, j) / 2
        return (frames * a + b).clamp_(0.0, 1.0)


#: Defaults of the ``clips`` section of the training config.
CLIP_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "num_frames": 3,
    "num_objects": 2,
    "two_object_prob": 0.5,
    "min_area_fraction": 0.002,
    "gaps": list(DEFAULT_GAPS),
    "gap_switch": list(DEFAULT_GAP_SWITCH),
    "gap_reference_mm": 3.0,
    "static_label_prob": 0.5,
    "superpixels": [8, 32],
    "slic_compactness": 0.1,
    "static_rotation": 15.0,
    "static_scale": [0.9, 1.1],
    "static_shear": 8.0,
    "static_translate": 0.06,
    "elastic_alpha": 0.015,
    "clip_rotation": 10.0,
    "clip_scale": [0.8, 1.2],
    "clip_translate": 0.08,
    "intensity_jitter": 0.05,
}
