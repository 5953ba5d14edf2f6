"""One colour per label, the same in napari, DICOM SEG, RTSTRUCT and 3D Slicer files (no Qt).

Known organ names get the colour 3D Slicer's generic anatomy table (and TotalSegmentator's
Slicer export) gives them; any other label gets a fixed colour from :data:`PALETTE`, chosen
by its id, so a label keeps its colour from session to session.

Example:
    >>> label_color("liver")
    (221, 130, 101)
    >>> label_colors({1: "liver", 2: "thing"})[2] == PALETTE[2 % len(PALETTE)]
    True
"""
from __future__ import annotations

from typing import Mapping

RGB = tuple[int, int, int]

#: Colours by normalised organ name (lower case, "_" for spaces and dashes).
KNOWN: dict[str, RGB] = {
    "liver": (221, 130, 101),
    "spleen": (157, 108, 162),
    "kidney_right": (185, 102, 83),
    "kidney_left": (185, 102, 83),
    "kidney": (185, 102, 83),
    "pancreas": (249, 180, 111),
    "aorta": (224, 97, 76),
    "inferior_vena_cava": (0, 151, 206),
    "portal_vein_and_splenic_vein": (0, 151, 206),
    "adrenal_gland_right": (244, 214, 49),
    "adrenal_gland_left": (244, 214, 49),
    "gallbladder": (139, 150, 98),
    "esophagus": (211, 171, 143),
    "stomach": (216, 132, 105),
    "duodenum": (255, 253, 229),
    "small_bowel": (205, 167, 142),
    "colon": (204, 168, 143),
    "urinary_bladder": (222, 154, 132),
    "bladder": (222, 154, 132),
    "lung": (197, 165, 145),
    "heart": (206, 110, 84),
    "vertebrae": (241, 214, 145),
    "spine": (241, 214, 145),
    "femur_left": (255, 237, 204),
    "femur_right": (255, 237, 204),
    "brainstem": (178, 212, 242),
    "spinalcord": (244, 214, 49),
    "spinal_cord": (244, 214, 49),
    "rightparotid": (255, 153, 102),
    "leftparotid": (255, 102, 153),
    "parotid_gland_right": (255, 153, 102),
    "parotid_gland_left": (255, 102, 153),
    "larynx": (128, 174, 128),
    "mandible": (255, 250, 220),
}

#: Fallback colours, indexed by ``id % len(PALETTE)`` (a qualitative palette, no black).
PALETTE: list[RGB] = [
    (128, 128, 128), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0),
    (255, 215, 180), (0, 0, 128),
]


def normalise(name: str) -> str:
    return str(name).strip().lower().replace(" ", "_").replace("-", "_")


def label_color(name: str | None, label_id: int = 0) -> RGB:
    """The colour of a label: by its name when known, else by its id."""
    if name is not None:
        key = normalise(name)
        if key in KNOWN:
            return KNOWN[key]
        if key.startswith("lung_"):
            return KNOWN["lung"]
        if key.startswith("vertebrae_"):
            return KNOWN["vertebrae"]
    return PALETTE[int(label_id) % len(PALETTE)]


def label_colors(label_map: Mapping[int, str]) -> dict[int, RGB]:
    """``{id: (r, g, b)}`` for every foreground id of ``{id: name}`` (0..255 each)."""
    return {int(i): label_color(n, int(i)) for i, n in label_map.items() if int(i) > 0}
