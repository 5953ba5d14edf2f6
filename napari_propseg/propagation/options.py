"""The options of :class:`~.engine.PropagationEngine`, their defaults and their checks (no torch).

One place for the engine's constants, so that the CLI, the widget and the pipeline read the
defaults without importing torch.
"""
from __future__ import annotations

import math

from ..errors import InputError
from .appearance import AppearanceOptions

METHODS = ("stcn", "interp")
#: Shape priors fused with the STCN probabilities between anchors (see ``prior``).
PRIORS = ("none", "sdf")
#: Adaptation steps of :meth:`~.engine.PropagationEngine.adapt` when neither it nor the engine names any.
DEFAULT_ADAPT_STEPS = 30
#: Exponent of the network's probabilities in the image-guided fusion (see ``network_weight``).
NETWORK_WEIGHT = 0.5
#: Cells (1/16 of the network's working resolution) added on every side of an object's extent
#: on the previous slice to form the box the STCN decoder works in (see ``decode_margin``).
DECODE_MARGIN = 2
#: Confidence given to slices this engine never computed (unknown, neither good nor bad).
UNKNOWN_CONFIDENCE = 0.5


def check_engine_options(*, method, memory_every, memory_cap, stop_threshold, stop_patience, prior, prior_weight,
                         prior_small_cells, pass_cache_mb, adapt_steps, network_weight, decode_margin=DECODE_MARGIN) -> None:
    """Raise :class:`~napari_propseg.errors.InputError` for an option out of range."""
    if method not in METHODS:
        raise InputError(f"Unknown propagation method {method!r}; use one of {', '.join(METHODS)}.")
    if int(memory_every) < 1 or int(memory_cap) < 2:
        raise InputError(f"memory_every must be >= 1 and memory_cap >= 2, got {memory_every} and {memory_cap}.")
    if not 0.0 < float(stop_threshold) < 1.0 or int(stop_patience) < 1:
        raise InputError(f"stop_threshold must lie in (0, 1) and stop_patience be >= 1, got {stop_threshold} and {stop_patience}.")
    if prior not in PRIORS:
        raise InputError(f"Unknown propagation prior {prior!r}; use one of {', '.join(PRIORS)}.")
    if not 0.0 <= float(prior_weight) <= 1.0:
        raise InputError(f"prior_weight must lie in [0, 1], got {prior_weight}.")
    if not float(prior_small_cells) >= 0.0:
        raise InputError(f"prior_small_cells must be 0 or more, got {prior_small_cells}.")
    if not (math.isfinite(float(pass_cache_mb)) and float(pass_cache_mb) >= 0.0):
        raise InputError(f"pass_cache_mb must be a number of megabytes, 0 or more, got {pass_cache_mb}.")
    if int(adapt_steps) < 0:
        raise InputError(f"adapt_steps must be 0 or more, got {adapt_steps}.")
    if not (math.isfinite(float(network_weight)) and float(network_weight) >= 0.0):
        raise InputError(f"network_weight must be a finite number, 0 or more, got {network_weight}.")
    if decode_margin is not None and int(decode_margin) < 0:
        raise InputError(f"decode_margin must be a number of memory cells, 0 or more (or None for the whole slice), got {decode_margin}.")
    if int(adapt_steps) > 0 and method != "stcn":
        raise InputError(f"Online adaptation (adapt_steps={adapt_steps}) fine-tunes the STCN network; use method='stcn' or adapt_steps=0.")


def appearance_options(appearance: AppearanceOptions | dict | None) -> AppearanceOptions:
    """``appearance`` as :class:`~.appearance.AppearanceOptions`: None gives the defaults; a
    dict holding ``weight`` alone fixes that weight (``{"weight": 0}``: no image term)."""
    if appearance is None:
        return AppearanceOptions()
    if isinstance(appearance, AppearanceOptions):
        return appearance
    opts = dict(appearance)
    if "weight" in opts:  # a weight given alone is a fixed weight (0: no image term)
        opts.setdefault("auto", False)
    try:
        return AppearanceOptions(**opts)
    except TypeError as exc:
        raise InputError(f"Unknown appearance option in {sorted(appearance)}; use weight, auto, candidates, "
                         "tau_mm, tau_growth, band_mm.") from exc
