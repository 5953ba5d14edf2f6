"""Installed reference models: one folder per task under ``models_dir()/reference/<name>/``.

A model folder holds the CPS pair (two ``*.pt`` weight files), the training config
(``train.yaml``), a model card (``card.md``), the label map (``labels.json``, id -> name)
and ``model.json`` (``region``, ``description``, ``training_data``). Names follow
TotalSegmentator's tasks: ``abdomen`` (the default) and ``head_neck``.
``$PROPSEG_MODELS`` moves the whole ``models/`` folder. ``model.json`` may also set
``min_agreement``: the Dice between the two networks' masks of an organ on a slice below
which the organ is left out of that slice (default 0.1; 0 keeps every organ); and the
defaults of ``propseg segment`` with this model: ``segment_k`` (reference slices: a number,
``"all"`` for every slice, or null for ``min(Z // 5, 64)``) and ``largest_component``
(keep each organ's largest 3-D connected piece). All are chosen per model on its tuning
cases (see its card).

Example:
    >>> [m.name for m in list_models()]   # doctest: +SKIP
    ['abdomen', 'head_neck']
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..weights import models_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "abdomen"


@dataclass(frozen=True)
class ReferenceModel:
    """One installed reference model (see the module docstring)."""

    name: str
    folder: Path
    weights: tuple[Path, ...]
    label_map: dict[int, str]
    region: str = ""
    description: str = ""
    training_data: str = ""
    min_agreement: float = 0.1
    segment_k: str | int | None = None
    largest_component: bool = False

    @property
    def card(self) -> Path | None:
        p = self.folder / "card.md"
        return p if p.is_file() else None

    @property
    def organs(self) -> list[str]:
        return [n for i, n in sorted(self.label_map.items()) if i > 0]

    def summary(self) -> str:
        """One line: name, region, organs, card, training data."""
        card = str(self.card) if self.card else "no card"
        return (f"{self.name}: region {self.region or '?'}; {len(self.organs)} organs ({', '.join(self.organs)}); "
                f"card {card}; trained on {self.training_data or '?'}")


def reference_root() -> Path:
    return models_dir() / "reference"


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"Model file {path} is unreadable ({exc.__class__.__name__}); restore it from the repository.") from exc
    if not isinstance(obj, dict):
        raise InputError(f"Model file {path} must hold a JSON object; restore it from the repository.")
    return obj


def _load(folder: Path) -> ReferenceModel | None:
    weights = tuple(sorted(folder.glob("*.pt")))
    if not weights:
        return None
    labels: dict[int, str] = {}
    if (folder / "labels.json").is_file():
        raw = _read_json(folder / "labels.json")
        labels = {int(k): str(v) for k, v in raw.items() if str(k).lstrip("-").isdigit()}
    info = _read_json(folder / "model.json") if (folder / "model.json").is_file() else {}
    return ReferenceModel(folder.name, folder, weights, labels, str(info.get("region", "")),
                          str(info.get("description", "")), str(info.get("training_data", "")),
                          float(info.get("min_agreement", 0.1)), info.get("segment_k"),
                          bool(info.get("largest_component", False)))


def list_models() -> list[ReferenceModel]:
    """Every installed model (folders of ``reference_root()`` with weight files), by name."""
    root = reference_root()
    if not root.is_dir():
        return []
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        m = _load(sub)
        if m is not None:
            out.append(m)
    return out


def find_model(name: str | None = None) -> ReferenceModel:
    """The installed model called ``name`` (default :data:`DEFAULT_MODEL`).

    Raises:
        InputError: no such model (the sentence lists the installed ones).
    """
    name = name or DEFAULT_MODEL
    folder = reference_root() / name
    m = _load(folder) if folder.is_dir() else None
    if m is None:
        have = ", ".join(x.name for x in list_models()) or "none"
        raise InputError(f"No reference model {name!r} in {reference_root()} (installed: {have}); "
                         "pass one of those with --model, or train one with 'propseg train reference CONFIG'.")
    return m


def model_label_map(nets, model: ReferenceModel | None = None) -> dict[int, str]:
    """Label names of a loaded pair: the model folder's ``labels.json``, else the networks'
    config ``label_names``, else ``label_<id>``."""
    if model is not None and model.label_map:
        return dict(model.label_map)
    for n in nets:
        names = getattr(n, "config", {}).get("label_names")
        if names:
            return {int(k): str(v) for k, v in names.items()}
    n_cls = int(nets[0].config["num_classes"]) if nets else 0
    return {0: "background", **{i: f"label_{i}" for i in range(1, n_cls)}}


def keep_largest_component(labels, ids=None):
    """Keep, for each organ id, only its largest 3-D connected piece (26-connectivity).

    Args:
        labels: ``(Z, Y, X)`` integer labels (changed in place and returned).
        ids: organ ids to clean (default: every id > 0 present).
    """
    import numpy as np
    from scipy import ndimage

    ids = [int(i) for i in np.unique(labels) if i > 0] if ids is None else list(ids)
    structure = np.ones((3, 3, 3), dtype=bool)
    for i in ids:
        mask = labels == i
        if not mask.any():
            continue
        comp, n = ndimage.label(mask, structure=structure)
        if n <= 1:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        labels[mask & (comp != int(np.argmax(sizes)))] = 0
    return labels
