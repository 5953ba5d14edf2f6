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
    # TotalSegmentator classes as its 3D Slicer colour table gives them
    "lung_upper_lobe_left": (172, 138, 115),
    "lung_lower_lobe_left": (224, 186, 162),
    "lung_upper_lobe_right": (172, 138, 115),
    "lung_middle_lobe_right": (202, 164, 140),
    "lung_lower_lobe_right": (224, 186, 162),
    "trachea": (182, 228, 255),
    "heart_myocardium": (206, 110, 84),
    "heart_atrium_left": (203, 108, 81),
    "heart_ventricle_left": (152, 55, 13),
    "heart_atrium_right": (210, 115, 89),
    "heart_ventricle_right": (181, 85, 57),
    "pulmonary_artery": (0, 122, 171),
    "brain": (250, 250, 225),
    "iliac_artery_left": (216, 101, 79),
    "iliac_artery_right": (216, 101, 79),
    "iliac_vena_left": (0, 151, 206),
    "iliac_vena_right": (0, 151, 206),
    "rib": (253, 232, 158),
    "humerus_left": (205, 179, 108),
    "humerus_right": (205, 179, 108),
    "scapula_left": (205, 179, 108),
    "scapula_right": (205, 179, 108),
    "clavicula_left": (205, 179, 108),
    "clavicula_right": (205, 179, 108),
    "hip_left": (212, 188, 102),
    "hip_right": (212, 188, 102),
    "sacrum": (212, 188, 102),
    "gluteus_maximus_left": (188, 95, 76),
    "gluteus_maximus_right": (188, 95, 76),
    "gluteus_medius_left": (178, 105, 76),
    "gluteus_medius_right": (178, 105, 76),
    "gluteus_minimus_left": (178, 95, 86),
    "gluteus_minimus_right": (178, 95, 86),
    "autochthon_left": (171, 85, 68),
    "autochthon_right": (171, 85, 68),
    "iliopsoas_left": (188, 95, 76),
    "iliopsoas_right": (188, 95, 76),
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
        if key.startswith("rib_"):
            return KNOWN["rib"]
    return PALETTE[int(label_id) % len(PALETTE)]


def label_colors(label_map: Mapping[int, str]) -> dict[int, RGB]:
    """``{id: (r, g, b)}`` for every foreground id of ``{id: name}`` (0..255 each)."""
    return {int(i): label_color(n, int(i)) for i, n in label_map.items() if int(i) > 0}
