"""The STCN network's side of propagation: inputs, key/value caches, one pass, the pass cache.

:class:`StcnPasses` owns everything the engine needs from the network (torch is imported
here, so ``interp`` never loads it):

* **Keys are encoded once per slice** and cached for the engine's lifetime: all labels of a
  slice share one key and one affinity, and a second propagation re-encodes nothing.
* **Anchor values** are cached per (slice, label) until the slice's labels change.
* **One pass** (:meth:`StcnPasses.run_pass`) carries the objects of one anchor over a run of
  slices in order, with a bounded :class:`~.memory.MemoryBank` (the anchor plus every
  ``memory_every``-th propagated slice, at most ``memory_cap``); outward passes stop a label
  once its probability stays under ``stop_threshold`` everywhere on ``stop_patience``
  consecutive slices.
* **Each object is decoded in its own box**: the extent of its probability on the previous
  slice (on the anchor: its mask) widened by ``decode_margin`` memory cells on every side;
  outside the box the object's probability is 0. The memory read and every object-free
  part of the decoder run once per slice over the whole frame
  (:meth:`~.network.STCN.segment_boxes`), the slice's share of it cached with its key;
  ``decode_margin=None`` decodes whole slices (the choice of 2 is measured in
  ``docs/ARCHITECTURE.md``, History).
* **Passes are cached** (up to ``pass_cache_mb``): a pass depends only on its start anchor,
  its objects and the slices it crosses, so when a new anchor ``c`` splits the gap
  ``(a, b)`` the pass from ``a`` up to ``c`` is the beginning of the old pass from ``a`` up
  to ``b``. Outputs are stored as 8-bit probabilities (steps of 1/255), which every fusion
  uses, so a cached and a fresh run give identical labels.

The network works at its config's resolution (body crop, slices resized to ``R x R``,
then windowed, as in training); on CUDA under fp16 autocast.

Seam: ``network_pass`` replaces :meth:`StcnPasses.run_pass` (same signature and output),
so tests can stand in for the network's predictions without touching private methods.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from ..crop import BodyCrop
from ..errors import InputError
from ..preprocess import resize_slices, window_ct
from ..progress import check_cancel
from .memory import MemoryBank
from .network import others_union
from .options import DECODE_MARGIN

log = logging.getLogger(__name__)

Tick = Callable[[int], None]


Box = tuple[int, int, int, int]

#: An object's probability above this marks where it is when its next box is drawn.
BOX_THRESHOLD = 0.25


class NetworkPass(Protocol):
    """One pass: ``(start, start_values (1, K, Cv, h, w), targets, *, stop, tick, cancel,
    boxes)`` -> ``{slice: (K+1, R, R) uint8 probabilities (x / 255), channel 0 background}``;
    ``tick(z)`` once per target; ``boxes``: the objects' extents on the anchor (K boxes in
    memory cells, see :func:`object_boxes`) or None."""

    def __call__(self, start: int, start_values: torch.Tensor, targets: list[int], *, stop: bool, tick: Tick,
                 cancel, boxes: list[Box] | None = None) -> dict[int, torch.Tensor]: ...


def object_boxes(masks: torch.Tensor, threshold: float, cells: int, margin: int,
                 previous: Sequence[Box] | None = None) -> list[Box]:
    """Boxes ``(y0, y1, x0, x1)`` in memory cells (end exclusive) around where each object is.

    Args:
        masks: (K, R, R) probabilities at the working resolution.
        threshold: a pixel above it belongs to the object.
        cells: memory cells per side (R / 16).
        margin: cells added on every side (clipped to the frame).
        previous: each object's last box, kept while the object is nowhere above
            ``threshold``; without it such an object gets the whole frame.

    Returns:
        K boxes.
    """
    size = masks.shape[-1]
    hit = masks > threshold
    rows = hit.any(dim=2).cpu().numpy()  # K, R
    cols = hit.any(dim=1).cpu().numpy()
    stride = size // cells
    boxes: list[Box] = []
    for k in range(masks.shape[0]):
        ys, xs = np.flatnonzero(rows[k]), np.flatnonzero(cols[k])
        if ys.size == 0:
            boxes.append(tuple(previous[k]) if previous is not None else (0, cells, 0, cells))
            continue
        boxes.append((max(0, int(ys[0]) // stride - margin), min(cells, int(ys[-1]) // stride + 1 + margin),
                      max(0, int(xs[0]) // stride - margin), min(cells, int(xs[-1]) // stride + 1 + margin)))
    return boxes


def slice_digest(label_slice: np.ndarray, locked: np.ndarray) -> bytes:
    """Digest of one slice's labels and the locked ids: what an anchor's values and passes depend on."""
    return hashlib.blake2b(np.ascontiguousarray(label_slice).tobytes() + locked.tobytes(), digest_size=16).digest()


def tick_through(targets: Sequence[int], tick: Tick, cancel) -> None:
    """Report progress over slices that need no network (cached or empty pass)."""
    for z in targets:
        check_cancel(cancel)
        tick(z)


@dataclass
class CachedPass:
    """The 8-bit outputs of one finished pass, in target order."""

    targets: list[int]
    probs: dict[int, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.probs.values())


def quantize(p: torch.Tensor) -> torch.Tensor:
    """Probabilities in [0, 1] to uint8 steps of 1/255 (a quarter of float32's memory)."""
    return (p * 255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)


def dequantize(q: torch.Tensor) -> torch.Tensor:
    """uint8 steps of 1/255 back to float32 probabilities."""
    return q.to(torch.float32) / 255.0


def expand(q: torch.Tensor | None, have: Sequence[int], objects: Sequence[int], size: int, device: torch.device) -> torch.Tensor:
    """A pass's 8-bit (len(have)+1, R, R) output as float32 (K+1, R, R) over ``objects``
    (a superset of ``have``): objects the pass did not carry get probability 0; None (the
    pass from an anchor without labels) is all background."""
    if q is not None and list(have) == list(objects):
        return dequantize(q)
    full = torch.zeros((len(objects) + 1, size, size), dtype=torch.float32, device=device)
    if q is None:
        full[0] = 1.0
        return full
    p = dequantize(q)
    full[0] = p[0]
    where = {o: i for i, o in enumerate(objects)}
    full[torch.as_tensor([1 + where[o] for o in have], dtype=torch.int64, device=p.device)] = p[1:]
    return full


def channel_argmax(p: torch.Tensor) -> torch.Tensor:
    """Arg-max over the class axis of (C, H, W): ``torch.max(..., dim=0).indices`` (same
    result, first maximum on ties; on the CPU about 10x faster than ``argmax(dim=0)`` for
    11 x 400 x 400, which dominated the per-slice finishing time)."""
    return torch.max(p, dim=0).indices


def open_network(weights, model, device: torch.device, default_path: Callable[[], Path]) -> tuple[Any, Path | None, str]:
    """The STCN to propagate with: ``model`` as given, else loaded from ``weights`` (None:
    ``default_path()``) onto ``device`` in eval mode. Returns ``(model, weight file or None,
    the crop it was trained with: "body" or "none")``.

    Raises:
        InputError: no weight file, or weights trained with a crop this version cannot repeat.
    """
    from .network import load_stcn

    path = None
    if model is None:
        path = Path(weights).expanduser() if weights is not None else default_path()
        if weights is None and not path.is_file():
            raise InputError(
                f"No trained propagation weights were found (looked for {path}); train them with "
                "'propseg train propagation' or pass --weights, or use method='interp' (--method interp) "
                "for signed-distance interpolation."
            )
        model = load_stcn(path).to(device).eval()
    crop = ((getattr(model, "meta", None) or {}).get("preprocessing") or {}).get("crop", "none")
    if crop not in ("body", "none"):
        raise InputError(f"Weights {path} were trained with crop={crop!r}, which this version cannot repeat; retrain with crop 'body' or 'none'.")
    return model, path, crop


class StcnPasses:
    """The network's passes over one volume, with their caches (see the module docstring).

    Args:
        model: the STCN in eval mode, on ``device``.
        volume_hu: (Z, Y, X) HU.
        crop: the body crop the weights were trained on.
        device: torch device.
        memory_every, memory_cap, stop_threshold, stop_patience, decode_margin: see the
            module docstring.
        pass_cache_mb: most megabytes of pass outputs kept (0: no pass cache).
        stats: counters updated in place (keys/values encoded, memory peak, passes run/reused).
        network_pass: replaces :meth:`run_pass` (a test seam, see :class:`NetworkPass`).
    """

    def __init__(self, model, volume_hu: np.ndarray, crop: BodyCrop, device: torch.device, *, memory_every: int,
                 memory_cap: int, stop_threshold: float, stop_patience: int, pass_cache_mb: float, stats: dict,
                 network_pass: NetworkPass | None = None, decode_margin: int | None = DECODE_MARGIN) -> None:
        self.model = model
        self.volume_hu = volume_hu
        self.crop = crop
        self.device = device
        self.memory_every, self.memory_cap = int(memory_every), int(memory_cap)
        self.stop_threshold, self.stop_patience = float(stop_threshold), int(stop_patience)
        self.decode_margin = None if decode_margin is None else int(decode_margin)
        self.stats = stats
        self._run = network_pass if network_pass is not None else self.run_pass
        self.keys: dict[int, tuple[torch.Tensor, ...]] = {}
        # (anchor, label) -> (slice digest, value, the label's box on the anchor)
        self.values: dict[tuple[int, int], tuple[bytes, torch.Tensor, Box]] = {}
        self._cache_dtype = torch.float16 if device.type == "cuda" else torch.float32
        # (start, direction, stop, digest of the start anchor's labels + locked ids) -> CachedPass, oldest used first
        self.passes: OrderedDict[tuple, CachedPass] = OrderedDict()
        self._pass_budget = int(float(pass_cache_mb) * 2**20)

    @property
    def resolution(self) -> int:
        return self.model.resolution

    def use_model(self, model) -> None:
        """Propagate with ``model`` from now on; every cache is emptied if it differs."""
        if model is not self.model:
            self.model = model
            self.clear()

    def clear(self) -> None:
        """Forget every cached key, value and pass (they belong to the weights that made them)."""
        self.keys.clear()
        self.values.clear()
        self.passes.clear()

    def prune(self, labels: np.ndarray, anchors: Sequence[int], locked: np.ndarray) -> None:
        """Drop cached passes whose start slice is no longer an anchor or whose anchor labels
        changed (they can never be reused for these labels; frees their memory now)."""
        current = set(anchors)
        for key in list(self.passes):
            start, digest = key[0], key[-1]
            if start not in current or digest != slice_digest(labels[start], locked):
                del self.passes[key]

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def frame(self, z: int) -> torch.Tensor:
        """(1, 3, R, R) network input: (body crop,) HU resized bilinearly to R x R, then windowed.

        The same order as the training data (:mod:`napari_propseg.training.data`).
        """
        r = self.model.resolution
        hu = np.ascontiguousarray(self.crop.crop(self.volume_hu[z], -1000.0), dtype=np.float32)
        return window_ct(resize_slices(torch.from_numpy(hu).to(self.device), (r, r), mode="bilinear")).unsqueeze(0)

    def features(self, z: int) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """Cached ``(key, f16, query)`` of slice z: key and f16 (1, C, h, w), ``query`` the
        decoder's object-free part (:meth:`~.network.STCN.decoder_query`); encoded on first use."""
        feats = self.keys.get(z)
        if feats is None:
            with self.autocast():
                key, f16, f8, f4 = self.model.encode_key(self.frame(z))
                query = self.model.decoder_query(f16, f8, f4)
            feats = (key.to(self._cache_dtype), f16.to(self._cache_dtype), tuple(t.to(self._cache_dtype) for t in query))
            self.keys[z] = feats
            self.stats["keys_encoded"] += 1
        return feats

    def masks(self, label_slice: np.ndarray, objects: Sequence[int]) -> torch.Tensor:
        """(1, K, R, R) soft masks of the objects on one slice at working resolution."""
        r = self.model.resolution
        lab = torch.from_numpy(np.ascontiguousarray(self.crop.crop(label_slice, 0)).astype(np.int64)).to(self.device)
        ids = torch.as_tensor(list(objects), dtype=torch.int64, device=self.device)
        onehot = (lab[None] == ids[:, None, None]).to(torch.float32)  # K, Y, X
        return resize_slices(onehot, (r, r), mode="bilinear").clamp_(0.0, 1.0).unsqueeze(0)

    def anchor_values(self, z: int, label_slice: np.ndarray, objects: Sequence[int], locked: np.ndarray) -> torch.Tensor:
        """(1, K, Cv, h, w) memory values of the objects on anchor slice z, cached.

        An object's anchor value depends only on the slice, its own mask and the union of
        the slice's other (unlocked) labels, not on which other objects the pass carries,
        so it is cached per (slice, label) and reused by every pass starting from this
        anchor until the slice's labels change; the label's box there (:meth:`anchor_boxes`)
        is kept with it, from the same mask.
        """
        digest = slice_digest(label_slice, locked)
        missing = [i for i in objects if self.values.get((z, i), (None,))[0] != digest]
        if missing:
            fg_ids = [int(i) for i in np.unique(label_slice) if i != 0 and i not in locked]
            fg = self.masks(label_slice, fg_ids).sum(dim=1, keepdim=True).clamp_(0.0, 1.0) if fg_ids else None
            masks = self.masks(label_slice, missing)  # 1, M, R, R
            others = (fg - masks).clamp_(0.0, 1.0) if fg is not None else torch.zeros_like(masks)
            values = self.encode_value(z, self.features(z)[1], masks, others)[0]  # M, Cv, h, w
            cells = self.model.resolution // 16
            boxes = object_boxes(masks[0], 0.0, cells, 0 if self.decode_margin is None else self.decode_margin)
            for i, v, box in zip(missing, values, boxes):
                self.values[(z, i)] = (digest, v, box)
        return torch.stack([self.values[(z, i)][1] for i in objects]).unsqueeze(0)

    def encode_value(self, z: int, f16: torch.Tensor, masks: torch.Tensor, others: torch.Tensor | None = None) -> torch.Tensor:
        """(1, K, Cv, h, w) values of slice z for (1, K, R, R) masks (others: their complements)."""
        with self.autocast():
            v = self.model.encode_slice_values(self.frame(z), f16, masks, others_union(masks) if others is None else others)
        self.stats["values_encoded"] += masks.shape[1]
        return v

    def anchor_boxes(self, z: int, objects: Sequence[int]) -> list[Box] | None:
        """The objects' boxes on anchor slice z, kept with their values by
        :meth:`anchor_values` (None when whole slices are decoded)."""
        if self.decode_margin is None:
            return None
        return [self.values[(z, i)][2] for i in objects]

    def run_pass(self, start: int, start_values: torch.Tensor, targets: list[int], *, stop: bool, tick: Tick,
                 cancel, boxes: list[Box] | None = None) -> dict[int, torch.Tensor]:
        """One propagation pass from an anchor over ``targets`` (in order).

        Args:
            start: anchor slice.
            start_values: (1, K, Cv, h, w) memory values of the K objects on the anchor.
            targets: slices to segment, in propagation order.
            stop: stop objects that vanish (outward passes).
            tick: called once per target slice.
            boxes: the objects' boxes on the anchor (:meth:`anchor_boxes`); each object is
                then decoded in the box around its extent on the slice before. None, or
                ``decode_margin`` None: whole slices.

        Returns:
            slice -> (K+1, R, R) uint8 probabilities (x / 255; channel 0 background):
            compact while other passes run, and what :meth:`cached_pass` keeps.
        """
        k = start_values.shape[1]
        bank = MemoryBank(cap=self.memory_cap, every=self.memory_every)
        bank.add(start, self.features(start)[0][0], start_values[0], anchor=True)
        active = torch.ones(k, dtype=torch.bool, device=self.device)
        misses = torch.zeros(k, dtype=torch.int64, device=self.device)
        probs: dict[int, torch.Tensor] = {}
        r = self.model.resolution
        cells = r // 16
        if boxes is None or self.decode_margin is None:
            boxes = [(0, cells, 0, cells)] * k
        for step, z in enumerate(targets, start=1):
            check_cancel(cancel)
            prob = torch.zeros((k + 1, r, r), dtype=torch.float32, device=self.device)
            if bool(active.any()):
                idx = torch.nonzero(active).flatten()
                qk, f16, query = self.features(z)
                mk, mv = bank.tensors()
                with self.autocast():
                    logits = self.model.segment_boxes(qk, query, mk, mv[:, idx], [boxes[i] for i in idx.tolist()])
                p = torch.softmax(logits.float(), dim=1)[0]  # Ka+1, R, R
                prob[0] = p[0]
                prob[1 + idx] = p[1:]
                if self.decode_margin is not None:
                    boxes = object_boxes(prob[1:], BOX_THRESHOLD, cells, self.decode_margin, boxes)
                if stop:
                    present = (prob[1:] > self.stop_threshold).flatten(1).any(dim=1)
                    misses = torch.where(present, torch.zeros_like(misses), misses + 1)
                    newly = active & (misses >= self.stop_patience)
                    if bool(newly.any()):
                        log.debug("outward pass from %d: object(s) %s stop at slice %d", start, torch.nonzero(newly).flatten().tolist(), z)
                    active &= ~newly
                if bank.wants(step) and bool(active.any()):
                    idx = torch.nonzero(active).flatten()
                    masks = prob[1:].unsqueeze(0)  # 1, K, R, R
                    v_act = self.encode_value(z, f16, masks[:, idx], others_union(masks)[:, idx])
                    if len(idx) == k:
                        v = v_act
                    else:  # stopped objects keep zero values: they are never read again
                        v = torch.zeros((1, k) + tuple(v_act.shape[2:]), dtype=v_act.dtype, device=self.device)
                        v[:, idx] = v_act
                    bank.add(z, qk[0], v[0])
            else:
                prob[0] = 1.0
            probs[z] = quantize(prob)
            tick(z)
        self.stats["memory_peak"] = max(self.stats["memory_peak"], bank.peak)
        return probs

    def cached_pass(self, start: int, labels: np.ndarray, locked: np.ndarray, targets: list[int], *,
                    stop: bool, tick: Tick, cancel) -> tuple[dict[int, torch.Tensor | None], list[int]]:
        """A pass from anchor ``start`` over ``targets``, carrying the (unlocked) labels of
        that anchor, 8-bit; reused when cached.

        A pass is a function of its start anchor's labels, its direction and stop rule and
        the slices it crosses (in order, always beginning next to the anchor), so any
        earlier pass with the same key whose targets begin with ``targets`` holds the
        answer. A cancelled pass caches nothing. An anchor without labels ("no organ here")
        runs no network: its pass is pure background (``None`` per slice).

        Returns:
            (slice -> (K+1, R, R) uint8 probabilities (x / 255) or None, the K object ids).
        """
        objects = [int(i) for i in np.unique(labels[start]) if i != 0 and i not in locked]
        if not objects:
            tick_through(targets, tick, cancel)
            return {z: None for z in targets}, objects
        digest = slice_digest(labels[start], locked)
        key = (start, 1 if targets[0] > start else -1, stop, digest)
        hit = self.passes.get(key)
        if hit is not None and hit.targets[: len(targets)] == targets:
            self.passes.move_to_end(key)
            self.stats["passes_reused"] += 1
            tick_through(targets, tick, cancel)
            return {z: hit.probs[z] for z in targets}, objects
        values = self.anchor_values(start, labels[start], objects, locked)
        probs = self._run(start, values, targets, stop=stop, tick=tick, cancel=cancel,
                          boxes=self.anchor_boxes(start, objects))
        self.stats["passes_run"] += 1
        if self._pass_budget > 0:
            entry = CachedPass(list(targets), probs)
            if entry.nbytes <= self._pass_budget:
                if hit is not None:  # a shorter pass of the same key: the new one covers it
                    del self.passes[key]
                self.passes[key] = entry
                while sum(p.nbytes for p in self.passes.values()) > self._pass_budget:
                    self.passes.popitem(last=False)
        return dict(probs), objects
