"""The one way to build and run propagation: :class:`EngineSettings` -> :func:`make_engine`,
:func:`propagate` and :func:`segment` (suggest, then propagate). No Qt, no torch at import.

The CLI (``propseg propagate``, ``propseg segment``), the session (and so the widget), the
benchmarks and training validation all build their engine here, with one set of defaults:

* ``method="stcn"``, ``device="auto"``, the shipped weights (``weights=None``),
* the image weight chosen per volume on its anchors (``image_weight=None``; a number fixes
  it, 0 switches the CT intensity model off),
* the network's weight in the guided fusion :data:`~.propagation.options.NETWORK_WEIGHT`,
* no online adaptation (``adapt_steps=0``).

Only the settings that differ from the engine's defaults are passed to the factory, so a
stand-in factory (tests) needs to take only what it is given.

Example:
    >>> from napari_propseg.pipeline import EngineSettings, propagate
    >>> res = propagate(ct, seeds, [10, 40], EngineSettings(method="interp"))   # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .errors import InputError
from .progress import CancelFn, ProgressFn
from .propagation.options import METHODS, NETWORK_WEIGHT

EngineFactory = Callable[..., Any]


@dataclass(frozen=True)
class EngineSettings:
    """How to build a propagation engine (see the module docstring for the defaults).

    Attributes:
        method: ``"stcn"`` (memory network) or ``"interp"`` (image-guided SDF interpolation).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (or a resolved ``torch.device``).
        weights: STCN weight file (None: the shipped ``stcn_default.pt``; unused by interp).
        image_weight: weight of the CT intensity model between anchors; None chooses it
            per volume on the anchors, 0 switches it off.
        network_weight: exponent of the network's probabilities in the guided fusion.
        adapt_steps: online adaptation steps before propagating (STCN only).
        options: any other :class:`~.propagation.engine.PropagationEngine` keyword
            (ablations: ``prior``, ``appearance``, ``pass_cache_mb``, ...).
    """

    method: str = "stcn"
    device: str = "auto"
    weights: str | None = None
    image_weight: float | None = None
    network_weight: float = NETWORK_WEIGHT
    adapt_steps: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"Unknown propagation method {self.method!r}; use one of {', '.join(METHODS)}.")

    def replace(self, **changes) -> "EngineSettings":
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)

    def engine_kwargs(self, spacing: Sequence[float] | None = None) -> dict[str, Any]:
        """Keyword arguments of the engine: method and device always, the others only when
        they differ from the engine's defaults (``spacing`` when given)."""
        kwargs: dict[str, Any] = {"method": self.method, "device": self.device}
        if self.weights is not None:
            kwargs["weights"] = str(self.weights)
        if spacing is not None:
            kwargs["spacing"] = tuple(float(v) for v in spacing)
        if self.adapt_steps:
            kwargs["adapt_steps"] = int(self.adapt_steps)
        if self.image_weight is not None:
            kwargs["appearance"] = {"weight": float(self.image_weight)}
        if float(self.network_weight) != NETWORK_WEIGHT:
            kwargs["network_weight"] = float(self.network_weight)
        kwargs.update(self.options)
        return kwargs


def make_engine(image_hu: np.ndarray, settings: EngineSettings | None = None, *, spacing: Sequence[float] | None = None,
                engine_factory: EngineFactory | None = None) -> Any:
    """Build the propagation engine for one volume.

    Args:
        image_hu: (Z, Y, X) CT in HU.
        settings: :class:`EngineSettings` (None: the defaults).
        spacing: ``(sz, sy, sx)`` mm of ``image_hu`` (body crop, image model's softness).
        engine_factory: stands in for :class:`~.propagation.engine.PropagationEngine` (tests).

    Raises:
        InputError: bad settings, no weights, an unknown device (from the engine).
    """
    settings = settings or EngineSettings()
    if engine_factory is None:
        from .propagation.engine import PropagationEngine as engine_factory  # noqa: N813
    return engine_factory(image_hu, **settings.engine_kwargs(spacing))


def check_engine(engine: Any, settings: EngineSettings) -> None:
    """Raise :class:`~.errors.InputError` when a :class:`~.propagation.engine.PropagationEngine`
    was built with another method or device than ``settings`` asks for (a reused engine must
    not silently run something else). Stand-in engines (tests) are not checked."""
    from .propagation.engine import PropagationEngine

    if not isinstance(engine, PropagationEngine):
        return
    if engine.method != settings.method or engine.device_name != settings.device:
        raise InputError(f"The engine given propagates with {engine.method!r} on {engine.device_name!r}, but "
                         f"{settings.method!r} on {settings.device!r} was asked for; build a new engine for these settings.")


def propagate(image_hu: np.ndarray, labels: np.ndarray, anchors: Sequence[int], settings: EngineSettings | None = None, *,
              spacing: Sequence[float] | None = None, changed: Sequence[int] | None = None, locked_labels: Iterable[int] = (),
              progress: ProgressFn = None, cancel: CancelFn = None, engine: Any = None,
              engine_factory: EngineFactory | None = None) -> Any:
    """Propagate ``labels`` from ``anchors`` (blocking).

    Args:
        image_hu, spacing, settings, engine_factory: as :func:`make_engine`.
        labels: (Z, Y, X) labels holding the anchor slices.
        anchors: anchor slice indices.
        changed: when given, the slices corrected since the last propagation: only the
            gaps next to them are recomputed (``repropagate``).
        locked_labels: label ids kept exactly as in ``labels``.
        progress, cancel: ``(step, total, message)`` callback; returns True to stop.
        engine: an engine built earlier for this volume (re-propagation reuses its caches);
            it must use ``settings.method`` (:func:`check_engine`).

    Returns:
        The engine's :class:`~.propagation.engine.PropagationResult`.
    """
    settings = settings or EngineSettings()
    if engine is None:
        engine = make_engine(image_hu, settings, spacing=spacing, engine_factory=engine_factory)
    else:
        check_engine(engine, settings)
    locked = tuple(int(i) for i in locked_labels)
    if changed:
        return engine.repropagate(labels, list(anchors), list(changed), locked_labels=locked, progress=progress, cancel=cancel)
    return engine.propagate(labels, list(anchors), locked_labels=locked, progress=progress, cancel=cancel)


def segment(image_hu: np.ndarray, settings: EngineSettings | None = None, *, spacing: Sequence[float] | None = None,
            reference_weights=None, k=None, scan: int | None = None, model: str | None = None,
            min_agreement: float | None = None, largest_component: bool | None = None, progress: ProgressFn = None,
            cancel: CancelFn = None):
    """Fully automatic segmentation: the reference networks label ``k`` slices
    (:func:`~.reference.inference.suggest_slices`), the engine fills the others.

    ``k`` and ``largest_component`` default to the installed model's ``segment_k`` and
    ``largest_component`` (``model.json``) when ``reference_weights`` is None; ``k="all"``
    runs the reference pair on every slice (propagation then has nothing left to fill).
    The reference networks run on ``settings.device``.

    Returns:
        ``(labels (Z, Y, X), Suggestion)``.
    """
    from .reference.inference import suggest_slices
    from .reference.models import find_model, keep_largest_component

    settings = settings or EngineSettings()
    n_slices = int(np.shape(image_hu)[0]) if np.ndim(image_hu) else 0
    try:
        info = find_model(model) if reference_weights is None else None
    except InputError:  # an old flat models/reference/*.pt folder: no model settings
        info = None
    if info is not None:
        if k is None and info.segment_k is not None:
            k = info.segment_k
        if largest_component is None:
            largest_component = info.largest_component
    if isinstance(k, str):
        if k.lower() != "all":
            raise InputError(f"k must be a number of slices or 'all', got {k!r}.")
        k = max(n_slices, 1)
    sug = suggest_slices(image_hu, reference_weights, k=k, scan=scan, device=settings.device, progress=progress, cancel=cancel,
                         model=model, min_agreement=min_agreement)
    if len(sug.slices) >= n_slices:  # every slice was segmented: nothing to propagate
        labels = sug.labels.copy()
    else:
        labels = propagate(image_hu, sug.labels, list(sug.slices), settings, spacing=spacing, progress=progress,
                           cancel=cancel).labels
    if largest_component:
        labels = keep_largest_component(np.array(labels, copy=True))
    return labels, sug
