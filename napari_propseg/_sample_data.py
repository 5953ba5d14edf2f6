"""napari sample data: the synthetic abdominal CT phantom and its organ labels."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

#: Sample phantom grid: (Z, Y, X) voxels and (sz, sy, sx) mm.
SAMPLE_SHAPE = (64, 192, 192)
SAMPLE_SPACING = (3.0, 1.6, 1.6)
SAMPLE_SEED = 0


def make_sample_data(shape=SAMPLE_SHAPE, spacing=SAMPLE_SPACING, seed: int = SAMPLE_SEED) -> list[tuple]:
    """The phantom as napari layer data: a CT Image layer and its ground-truth Labels.

    Args:
        shape: (Z, Y, X) voxels.
        spacing: (sz, sy, sx) mm.
        seed: phantom seed (another seed, another patient).

    Returns:
        ``[(ct_hu, kwargs, "image"), (labels, kwargs, "labels")]``; both layers carry the
        phantom geometry in ``metadata["propseg_volume"]`` and ``scale`` = spacing.
    """
    from ._reader import layer_data_for
    from .phantom import make_phantom

    ct, labels = make_phantom(shape, spacing, seed)
    img = layer_data_for(ct, name="phantom CT")
    lab_data, lab_kwargs, _ = layer_data_for(labels, name="phantom labels (ground truth)")
    lab_kwargs["metadata"]["propseg_label_names"] = {int(k): str(v) for k, v in labels.meta.get("label_names", {}).items()}
    return [img, (lab_data, lab_kwargs, "labels")]
