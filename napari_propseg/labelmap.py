"""Label maps: the FLARE-22 abdominal organ ids used everywhere, and conversion from
TotalSegmentator v1/v2 label volumes (matched by organ NAME, since v1 and v2 number
their classes differently).

Example:
    >>> names = {5: "liver", 1: "spleen"}                 # a TotalSegmentator v1 excerpt
    >>> import numpy as np
    >>> map_totalsegmentator(np.array([0, 1, 5]), names).tolist()
    [0, 3, 1]
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

#: The 13 FLARE-22 organs: id -> name (0 is background).
FLARE13: dict[int, str] = {
    1: "liver",
    2: "kidney_right",
    3: "spleen",
    4: "pancreas",
    5: "aorta",
    6: "inferior_vena_cava",
    7: "adrenal_gland_right",
    8: "adrenal_gland_left",
    9: "gallbladder",
    10: "esophagus",
    11: "stomach",
    12: "duodenum",
    13: "kidney_left",
}
#: Id of the extra class the phantom (and TotalSegmentator conversion) adds.
VERTEBRAE_ID = 14
#: Every label id the project uses -> name: FLARE-13 plus 14 vertebrae (no background).
FLARE_NAMES: dict[int, str] = {**FLARE13, VERTEBRAE_ID: "vertebrae"}
#: name -> id, inverse of FLARE_NAMES.
FLARE_IDS: dict[str, int] = {name: i for i, name in FLARE_NAMES.items()}

# TotalSegmentator class names (v1 and v2) that fold into a FLARE class other than the
# one of the same name. Kidney cysts (v2) lie inside the kidney, which FLARE labels whole.
_TS_ALIASES: dict[str, str] = {
    "kidney_cyst_right": "kidney_right",
    "kidney_cyst_left": "kidney_left",
}


def _norm(name: str) -> str:
    return str(name).strip().lower().replace(" ", "_").replace("-", "_")


def totalsegmentator_to_flare(names: Mapping[int, str], *, vertebrae: bool = True) -> dict[int, int]:
    """Id translation table TotalSegmentator -> FLARE, built from class names.

    Args:
        names: TotalSegmentator id -> class name (v1 or v2 ``labels.json`` content).
        vertebrae: map every ``vertebrae_*`` class to :data:`VERTEBRAE_ID` (14).

    Returns:
        {TotalSegmentator id: FLARE id} for the classes that have a FLARE counterpart.
    """
    table: dict[int, int] = {}
    for ts_id, name in names.items():
        n = _norm(name)
        n = _TS_ALIASES.get(n, n)
        if n in FLARE_IDS and FLARE_IDS[n] != VERTEBRAE_ID:
            table[int(ts_id)] = FLARE_IDS[n]
        elif vertebrae and n.startswith("vertebrae"):
            table[int(ts_id)] = VERTEBRAE_ID
    missing = sorted(set(FLARE13.values()) - {FLARE_NAMES[f] for f in table.values()})
    if missing:
        log.info("TotalSegmentator label map has no class for FLARE organs: %s", ", ".join(missing))
    return table


def translate_by_name(source: Mapping[int, str], target: Mapping[int, str]) -> dict[int, int]:
    """Id table from one label map to another, matching class names.

    Names are compared case-insensitively with spaces and dashes as underscores. Wherever a
    target id carries its FLARE name (:data:`FLARE_NAMES`), the TotalSegmentator rules of
    :func:`totalsegmentator_to_flare` apply too (kidney cysts fold into their kidney,
    every ``vertebrae_*`` class into vertebrae), so a TotalSegmentator v1 or v2 ground truth
    can be scored against FLARE-id predictions.

    Args:
        source: id -> name of the ids to translate (e.g. a TotalSegmentator ``labels.json``).
        target: id -> name of the ids wanted.

    Returns:
        {source id: target id} for the source classes that have a counterpart.
    """
    by_name = {_norm(n): int(i) for i, n in target.items()}
    table = {int(i): by_name[_norm(n)] for i, n in source.items() if _norm(n) in by_name}
    for ts_id, flare_id in totalsegmentator_to_flare(source, vertebrae=VERTEBRAE_ID in target.keys()).items():
        if _norm(target.get(flare_id, "")) == _norm(FLARE_NAMES[flare_id]):  # the target's id means the same organ
            table.setdefault(ts_id, flare_id)
    return table


def relabel(label_array: np.ndarray, table: Mapping[int, int]) -> np.ndarray:
    """``label_array`` with each id replaced by ``table[id]`` (ids not in the table: 0).

    Raises:
        InputError: non-integer or negative ids.
    """
    arr = np.asarray(label_array)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"A label volume needs integer ids, got pixel type {arr.dtype}.")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.array_equal(arr, np.round(arr)):
            raise InputError("The label volume holds non-integer values; it needs whole-number ids.")
        arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise InputError("The label volume holds negative ids; it needs ids >= 0.")
    out_max = max(table.values(), default=0)
    dtype = np.uint8 if out_max < 256 else np.uint16 if out_max < 65536 else np.int32
    top = int(arr.max()) if arr.size else 0
    if top >= 2**20:  # huge ids: map the distinct values, not a lookup table as long as the largest id
        ids, inverse = np.unique(arr, return_inverse=True)
        return np.array([table.get(int(i), 0) for i in ids], dtype=dtype)[inverse].reshape(arr.shape)
    lut = np.zeros(top + 1, dtype=dtype)  # ids above the largest present never occur
    for src, dst in table.items():
        if int(src) <= top:
            lut[int(src)] = int(dst)
    return lut[arr]


def map_totalsegmentator(label_array: np.ndarray, labels_json_names: Mapping[int, str], *, vertebrae: bool = True) -> np.ndarray:
    """Convert a TotalSegmentator (v1 or v2) label volume to FLARE ids, by class name.

    Args:
        label_array: integer TotalSegmentator ids, any shape (e.g. (Z, Y, X)).
        labels_json_names: TotalSegmentator id -> class name (keys int or str), e.g. from
            :func:`read_label_map` on TotalSegmentator's ``labels.json``.
        vertebrae: keep the vertebrae (all levels) as class 14.

    Returns:
        uint8 array of the same shape with FLARE ids (0 for every class without a FLARE
        counterpart, e.g. lungs, ribs).

    Raises:
        InputError: non-integer or negative ids in ``label_array``.
    """
    arr = np.asarray(label_array)
    table = totalsegmentator_to_flare({int(k): v for k, v in labels_json_names.items()}, vertebrae=vertebrae)
    out = relabel(arr, table)
    unknown = set(np.unique(arr).astype(np.int64).tolist()) - set(int(k) for k in labels_json_names) - {0}
    if unknown:
        log.warning("label ids %s are not in the TotalSegmentator label map; set to background", sorted(unknown)[:10])
    return out.astype(np.uint8)


def read_label_map(path: str | os.PathLike, key: str | None = None) -> dict[int, str]:
    """Read a label-map JSON: ``{"1": "liver", ...}`` (id -> name).

    A file holding several maps (``{"map name": {"1": "liver", ...}, ...}``, as the shared
    ``labels.json`` files do) needs ``key``: the map's name or a unique part of it
    (e.g. ``"v1"``).

    Returns:
        {id: name} with int ids, sorted; a ``0: "background"`` entry is kept if present.

    Raises:
        InputError: missing/unparsable file, ambiguous or unknown ``key``, bad entries.
    """
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"Label map {p} does not exist; check the path.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"Cannot read label map {p} ({exc}); it must be a JSON object of id -> name.") from None
    if not isinstance(data, dict):
        raise InputError(f"Label map {p} is not a JSON object; it must map ids to names, e.g. {{\"1\": \"liver\"}}.")
    if data and any(isinstance(v, dict) for v in data.values()):
        # several maps, perhaps beside metadata ("version": "2", "description": ...): the
        # maps are the entries that are objects
        names = [n for n, v in data.items() if isinstance(v, dict)]
        if key is None:
            if len(names) != 1:
                raise InputError(f"Label map {p} holds several maps ({', '.join(names)}); say which one to use.")
            chosen = names[0]
        else:
            hits = [n for n in names if n == key] or [n for n in names if key.lower() in n.lower()]
            if len(hits) != 1:
                raise InputError(f"Label map {p} has {'no' if not hits else 'several'} maps matching {key!r}; the maps are {', '.join(names)}.")
            chosen = hits[0]
        data = data[chosen]
    out: dict[int, str] = {}
    for k, v in data.items():
        try:
            i = int(k)
        except (TypeError, ValueError):
            if not isinstance(v, str):  # metadata beside the map ("version": 2, "colors": [...])
                log.debug("label map %s: skipping the non-id entry %r", p, k)
                continue
            raise InputError(f"Label map {p} has a non-integer id {k!r}; ids must be whole numbers.") from None
        if i < 0 or not isinstance(v, str):
            raise InputError(f"Label map {p} has a bad entry {k!r}: {v!r}; entries must be id >= 0 -> name.")
        out[i] = v
    if data and not out:
        raise InputError(f"Label map {p} holds no id -> name entry; it must map ids to names, e.g. {{\"1\": \"liver\"}}.")
    return dict(sorted(out.items()))


def write_label_map(names: Mapping[int, str], path: str | os.PathLike) -> Path:
    """Write ``{id: name}`` as JSON (ids as strings, sorted), atomically (see
    :mod:`napari_propseg.atomic`).

    Raises:
        OutputError (an InputError): the folder does not exist or is not writable, or
            the disk is full; an existing file is left as it was, no temporary file remains.
    """
    from .atomic import atomic_write_text, check_output_path

    p = check_output_path(path, what="label map")
    text = json.dumps({str(int(k)): str(v) for k, v in sorted(names.items(), key=lambda kv: int(kv[0]))}, indent=1)
    return atomic_write_text(p, text + "\n", what="label map")
