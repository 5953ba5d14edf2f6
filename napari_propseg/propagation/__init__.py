"""Label propagation from corrected anchor slices through a CT volume.

* :mod:`.network` - STCN memory network (:func:`build_stcn`, :func:`load_stcn`),
* :mod:`.resnet` - ResNet-18/50 trunks up to layer3,
* :mod:`.memory` - bounded memory bank of one propagation pass,
* :mod:`.engine` - :class:`PropagationEngine` (propagate, repropagate, suggest_next): orchestration,
* :mod:`.options` - the engine's defaults and option checks; :mod:`.segments` - the runs of
  slices a (re)propagation fills,
* :mod:`.stcn_passes` - the network's passes, key/value/pass caches (torch);
  :mod:`.stcn_fusion` - passes -> labels between and beyond the anchors,
* :mod:`.interp` - classical methods: SDF interpolation and copy-nearest,
* :mod:`.appearance` - image-guided fusion between anchors (SDF shape prior x CT intensity
  model); :mod:`.weighting` - the image weight chosen on the volume's own anchors,
* :mod:`.gap` - that fusion on the slices of one gap, in numpy (no torch),
* :mod:`.adapt` - online adaptation; :mod:`.clips` - the clip sampler it shares with training.

Build engines through :mod:`napari_propseg.pipeline` (one set of defaults).

Names are imported on first use, so importing the package does not import torch.
"""
import importlib

#: where each public name lives; imported on first use (the network modules need torch,
#: which ``interp`` and ``propseg info`` do without)
_WHERE = {
    "PropagationEngine": "engine", "PropagationResult": "engine", "default_weights_path": "engine",
    "copy_nearest": "interp", "sdf_interpolate": "interp",
    "MemoryBank": "memory",
    "CPU_CONFIG": "network", "DEFAULT_CONFIG": "network", "STCN": "network", "build_stcn": "network", "load_stcn": "network",
}

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


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
