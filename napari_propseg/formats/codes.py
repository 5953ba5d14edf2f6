"""Standard codes for segment names: SNOMED CT (scheme ``SCT``) category/type/modifier.

DICOM SEG segments carry a *segmented property category* and *type* code, and 3D Slicer
keeps the same triple in a ``TerminologyEntry`` tag. :func:`property_codes` turns a label
name (``"liver"``, ``"kidney_left"``, ``"Spinal Cord"``, ``"vertebrae_L1"``,
``"lung_upper_lobe_right"``) into that triple; names without a standard code get the
generic *Tissue* code. The code values are those of DICOM PS3.16 (as in pydicom's
``codes.SCT`` dictionary and dcmqi/3D Slicer), written out here so that a code never
changes with a library version.

Example:
    >>> c = property_codes("kidney_left")
    >>> c.type.value, c.type.meaning, c.modifier.meaning
    ('64033007', 'Kidney', 'Left')
    >>> property_codes("my thing").type.meaning
    'Tissue'
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Code:
    """One coded concept: value, coding scheme designator, meaning."""

    value: str
    scheme: str
    meaning: str

    def slicer(self) -> str:
        """``SCHEME^VALUE^MEANING`` as in a 3D Slicer terminology entry."""
        return f"{self.scheme}^{self.value}^{self.meaning}"


@dataclass(frozen=True)
class PropertyCodes:
    """Segmented property category, type and (laterality) type modifier of a segment."""

    category: Code
    type: Code
    modifier: Code | None = None
    known: bool = True  # False: the generic Tissue fallback

    def slicer_terminology(self) -> str:
        """The ``TerminologyEntry`` value of a 3D Slicer ``Segment<i>_Tags`` field."""
        mod = self.modifier.slicer() if self.modifier else "^^"
        return (f"Segmentation category and type - 3D Slicer General Anatomy list~{self.category.slicer()}~"
                f"{self.type.slicer()}~{mod}~Anatomic codes - DICOM master list~^^~^^")


ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
TISSUE = Code("85756007", "SCT", "Tissue")
RIGHT = Code("24028007", "SCT", "Right")
LEFT = Code("7771000", "SCT", "Left")

#: Segmented property type by normalised organ name (no laterality).
TYPES: dict[str, Code] = {
    "liver": Code("10200004", "SCT", "Liver"),
    "spleen": Code("78961009", "SCT", "Spleen"),
    "kidney": Code("64033007", "SCT", "Kidney"),
    "pancreas": Code("15776009", "SCT", "Pancreas"),
    "aorta": Code("15825003", "SCT", "Aorta"),
    "esophagus": Code("32849002", "SCT", "Esophagus"),
    "stomach": Code("69695003", "SCT", "Stomach"),
    "heart": Code("80891009", "SCT", "Heart"),
    "lung": Code("39607008", "SCT", "Lung"),
    "upper_lobe_of_lung": Code("45653009", "SCT", "Upper lobe of lung"),
    "lower_lobe_of_lung": Code("90572001", "SCT", "Lower lobe of lung"),
    "middle_lobe_of_right_lung": Code("72481006", "SCT", "Middle lobe of right lung"),
    "spinal_cord": Code("2748008", "SCT", "Spinal cord"),
    "brainstem": Code("119238007", "SCT", "Brainstem"),
    "brain": Code("12738006", "SCT", "Brain"),
    "parotid_gland": Code("45289007", "SCT", "Parotid gland"),
    "submandibular_gland": Code("54019009", "SCT", "Submandibular gland"),
    "larynx": Code("4596009", "SCT", "Larynx"),
    "trachea": Code("44567001", "SCT", "Trachea"),
    "mandible": Code("91609006", "SCT", "Mandible"),
    "spine": Code("421060004", "SCT", "Spine"),
    "vertebra": Code("51282000", "SCT", "Vertebra"),
    "urinary_bladder": Code("89837001", "SCT", "Urinary bladder"),
    "femur": Code("71341001", "SCT", "Femur"),
    "gallbladder": Code("28231008", "SCT", "Gallbladder"),
    "duodenum": Code("38848004", "SCT", "Duodenum"),
    "inferior_vena_cava": Code("64131007", "SCT", "Inferior vena cava"),
    "portal_vein": Code("32764006", "SCT", "Portal vein"),
    "adrenal_gland": Code("23451007", "SCT", "Adrenal gland"),
    "small_intestine": Code("30315005", "SCT", "Small intestine"),
    "colon": Code("71854001", "SCT", "Colon"),
    "rectum": Code("34402009", "SCT", "Rectum"),
    "prostate": Code("41216001", "SCT", "Prostate"),
    "thyroid": Code("69748006", "SCT", "Thyroid"),
    "eye": Code("81745001", "SCT", "Eye"),
    "lens": Code("78076003", "SCT", "Lens"),
    "optic_nerve": Code("18234004", "SCT", "Optic nerve"),
    "optic_chiasm": Code("244453006", "SCT", "Optic chiasm"),
    "oral_cavity": Code("74262004", "SCT", "Oral cavity"),
    "rib": Code("113197003", "SCT", "Rib"),
    "sternum": Code("56873002", "SCT", "Sternum"),
    "clavicle": Code("51299004", "SCT", "Clavicle"),
    "scapula": Code("79601000", "SCT", "Scapula"),
    "humerus": Code("85050009", "SCT", "Humerus"),
    "sacrum": Code("54735007", "SCT", "Sacrum"),
    "hip": Code("29836001", "SCT", "Hip"),
    "skull": Code("89546000", "SCT", "Skull"),
    "bone": Code("272673000", "SCT", "Bone"),
}

#: Other spellings -> a key of :data:`TYPES` (normalised: lower case, "_" separators).
ALIASES: dict[str, str] = {
    "spinalcord": "spinal_cord", "cord": "spinal_cord", "spinal_canal": "spinal_cord",
    "brain_stem": "brainstem",
    "parotid": "parotid_gland", "submandibular": "submandibular_gland",
    "oesophagus": "esophagus",
    "bladder": "urinary_bladder",
    "vertebrae": "vertebra", "vertebral_column": "spine", "spinal_column": "spine",
    "small_bowel": "small_intestine",
    "ivc": "inferior_vena_cava", "vena_cava_inferior": "inferior_vena_cava",
    "portal_vein_and_splenic_vein": "portal_vein",
    "adrenal": "adrenal_gland",
    "thyroid_gland": "thyroid",
    "clavicula": "clavicle",
    "gall_bladder": "gallbladder",
    "lungs": "lung", "kidneys": "kidney",
    "heart_myocardium": "heart",
    "optic_nerves": "optic_nerve", "chiasm": "optic_chiasm",
}

_SIDE_WORDS = {"left": LEFT, "l": LEFT, "lt": LEFT, "right": RIGHT, "r": RIGHT, "rt": RIGHT}
_LOBES = {"upper": "upper_lobe_of_lung", "lower": "lower_lobe_of_lung", "middle": "middle_lobe_of_right_lung"}


def normalise(name: str) -> str:
    """Lower case, spaces/dashes/dots as "_", no repeated or edge "_"."""
    s = re.sub(r"[\s\-./()]+", "_", str(name).strip().lower())
    return re.sub(r"_+", "_", s).strip("_")


def _split_side(key: str) -> tuple[str, Code | None]:
    """``kidney_left`` / ``left_kidney`` / ``parotid_l`` / ``leftparotid`` -> (base, side)."""
    parts = key.split("_")
    if len(parts) > 1 and parts[-1] in _SIDE_WORDS:
        return "_".join(parts[:-1]), _SIDE_WORDS[parts[-1]]
    if len(parts) > 1 and parts[0] in ("left", "right"):
        return "_".join(parts[1:]), _SIDE_WORDS[parts[0]]
    for word, side in (("left", LEFT), ("right", RIGHT)):  # "leftparotid", "rightkidney"
        rest = key[len(word):]
        if key.startswith(word) and rest and _lookup(rest) is not None:
            return rest, side
    return key, None


def _lookup(base: str) -> Code | None:
    if base in TYPES:
        return TYPES[base]
    if base in ALIASES:
        return TYPES[ALIASES[base]]
    return None


def property_codes(name: str | None) -> PropertyCodes:
    """The SNOMED category/type/modifier of a label name (generic Tissue when unknown).

    Args:
        name: label name, any case and separators; laterality as a ``left``/``right``
            (or ``l``/``r``) word before or after the organ.

    Returns:
        :class:`PropertyCodes`; ``known`` is False for the generic Tissue fallback.
    """
    key = normalise(name or "")
    if not key:
        return PropertyCodes(TISSUE, TISSUE, None, known=False)
    # TotalSegmentator lung lobes: lung_upper_lobe_left, lung_middle_lobe_right
    m = re.fullmatch(r"lung_(upper|lower|middle)_lobe_(left|right)", key)
    if m:
        return PropertyCodes(ANATOMICAL_STRUCTURE, TYPES[_LOBES[m.group(1)]], _SIDE_WORDS[m.group(2)])
    # vertebrae_L1, vertebra_T12, rib_left_3, ...
    for prefix, target in (("vertebrae_", "vertebra"), ("vertebra_", "vertebra")):
        if key.startswith(prefix):
            return PropertyCodes(ANATOMICAL_STRUCTURE, TYPES[target], None)
    m = re.fullmatch(r"rib_(left|right)_\d+", key)
    if m:
        return PropertyCodes(ANATOMICAL_STRUCTURE, TYPES["rib"], _SIDE_WORDS[m.group(1)])
    code = _lookup(key)
    if code is not None:
        return PropertyCodes(ANATOMICAL_STRUCTURE, code, None)
    base, side = _split_side(key)
    code = _lookup(base)
    if code is not None:
        return PropertyCodes(ANATOMICAL_STRUCTURE, code, side)
    return PropertyCodes(TISSUE, TISSUE, None, known=False)
