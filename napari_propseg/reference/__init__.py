"""Reference module: two 2-D networks that segment k sampled axial slices.

``build_reference_model(config)`` builds TransUNet R50-ViT-B/16 or DeepLabV3+ from an
architecture dict (``config["arch"]`` picks which; named presets in :data:`PRESETS`).
Every model has ``forward(x (B, 3, H, W), zpos (B,)) -> logits (B, C, H, W)`` and a
``config`` attribute, stored in its weight file so loading rebuilds the same variant.

Presets:

* ``transunet``: the paper's R50-ViT-B/16 at 224 (about 105 M parameters).
* ``deeplabv3plus``: ResNet-50 encoder, ASPP 256, low-level 48, at 512.
* ``transunet-small`` / ``deeplabv3plus-small``: CPU variants at 256 input (a ResNet-v2
  of units 2/2/2 and width 32 with a 4-layer, 256-wide ViT; a ResNet-18 of width 32 with
  ASPP 128 and a 128-wide decoder).
* ``transunet-tiny`` / ``deeplabv3plus-tiny``: test-sized variants (seconds on a CPU).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

from torch import nn

from ..errors import InputError
from ..weights import load_state_checked, load_weights, save_weights
from .deeplab import DEEPLAB_DEFAULTS, DeepLabV3Plus
from .transunet import TRANSUNET_DEFAULTS, TransUNet

KIND = "reference"

PRESETS: dict[str, dict] = {
    "transunet": {"arch": "transunet"},
    "deeplabv3plus": {"arch": "deeplabv3plus"},
    "transunet-small": {
        "arch": "transunet", "img_size": 256, "resnet_units": [2, 2, 2], "resnet_width": 32,
        "hidden_size": 256, "num_layers": 4, "num_heads": 8, "mlp_dim": 512,
        "decoder_channels": [128, 64, 32, 16],
    },
    "deeplabv3plus-small": {
        "arch": "deeplabv3plus", "img_size": 256, "encoder_depth": 18, "encoder_width": 32,
        "aspp_channels": 128, "low_level_channels": 48, "decoder_channels": 128,
    },
    "transunet-tiny": {
        "arch": "transunet", "img_size": 64, "resnet_units": [1, 1, 1], "resnet_width": 8,
        "hidden_size": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 64,
        "decoder_channels": [32, 16, 16, 8],
    },
    "deeplabv3plus-tiny": {
        "arch": "deeplabv3plus", "img_size": 64, "encoder_depth": 18, "encoder_width": 8,
        "aspp_channels": 32, "low_level_channels": 12, "decoder_channels": 32,
    },
}

ARCHS = {"transunet": (TransUNet, TRANSUNET_DEFAULTS), "deeplabv3plus": (DeepLabV3Plus, DEEPLAB_DEFAULTS)}


def resolve_config(config: dict | str) -> dict:
    """Expand a preset name or a dict with an optional ``"preset"`` key into a full config.

    Raises:
        ValueError: unknown preset or architecture.
    """
    if isinstance(config, str):
        config = {"preset": config}
    cfg = dict(config)
    preset = cfg.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown reference preset {preset!r}; choose from {sorted(PRESETS)}")
        cfg = {**copy.deepcopy(PRESETS[preset]), **cfg}
    arch = cfg.get("arch")
    if arch not in ARCHS:
        raise ValueError(f"reference config needs 'arch' in {sorted(ARCHS)}, got {arch!r}")
    return {**copy.deepcopy(ARCHS[arch][1]), **cfg}


def build_reference_model(config: dict | str) -> nn.Module:
    """Build a reference network from a config dict or preset name.

    Args:
        config: e.g. ``{"preset": "deeplabv3plus-small", "num_classes": 14, "ife": "entropy"}``
            or ``"transunet"``.

    Returns:
        An ``nn.Module`` with ``forward(x (B, 3, H, W), zpos (B,)) -> (B, C, H, W)`` and a
        ``config`` attribute holding the full architecture dict.
    """
    cfg = resolve_config(config)
    cls, _ = ARCHS[cfg["arch"]]
    return cls(cfg)


def save_reference_model(path: str | os.PathLike, model: nn.Module, meta: dict | None = None) -> Path:
    """Write a reference weight file (config + state dict + provenance)."""
    return save_weights(path, KIND, dict(model.config), model.state_dict(), meta)


def load_reference_model(path: str | os.PathLike) -> nn.Module:
    """Rebuild a reference network from its weight file (on the CPU, eval mode).

    Raises:
        InputError: missing or wrong file, or weights that do not fit their config.
    """
    config, state, meta = load_weights(path, KIND)
    try:
        model = build_reference_model(config)
    except (ValueError, TypeError) as exc:
        raise InputError(f"Weight file {path} has an unusable reference config ({exc}); retrain or pass another file.") from exc
    load_state_checked(model, state, path)
    model.meta = meta
    return model.eval()


__all__ = [
    "KIND", "PRESETS", "build_reference_model", "resolve_config", "save_reference_model", "load_reference_model",
    "TransUNet", "DeepLabV3Plus",
]
