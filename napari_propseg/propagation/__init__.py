"""Label propagation from corrected anchor slices through a CT volume.

* :mod:`.network` - STCN memory network (:func:`build_stcn`, :func:`load_stcn`),
* :mod:`.resnet` - ResNet-18/50 trunks up to layer3,
* :mod:`.memory` - bounded memory bank of one propagation pass,
* :mod:`.engine` - :class:`PropagationEngine` (propagate, repropagate, suggest_next),
* :mod:`.interp` - classical methods: SDF interpolation and copy-nearest,
* :mod:`.appearance` - image-guided fusion between anchors (SDF shape prior x CT intensity
  model, the image weight chosen per volume by leave-one-anchor-out).
"""
from .engine import PropagationEngine, PropagationResult, default_weights_path
from .interp import copy_nearest, sdf_interpolate
from .memory import MemoryBank
from .network import CPU_CONFIG, DEFAULT_CONFIG, STCN, build_stcn, load_stcn

__all__ = [
    "CPU_CONFIG",
    "DEFAULT_CONFIG",
    "STCN",
    "MemoryBank",
    "PropagationEngine",
    "PropagationResult",
    "build_stcn",
    "copy_nearest",
    "default_weights_path",
    "load_stcn",
    "sdf_interpolate",
]
