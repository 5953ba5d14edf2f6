"""File-name endings of images and label files, and the one helper that splits them off
(core, no Qt, no SimpleITK: cheap to import).

Example:
    >>> split_extension("Case_01.NII.GZ")
    ('Case_01', '.nii.gz')
    >>> split_extension("notes.txt")
    ('notes.txt', '')
"""
from __future__ import annotations

from typing import Sequence

#: File name endings read by :func:`napari_propseg.io.read_volume` (lower case; DICOM is a folder).
VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
#: File name endings written by :func:`napari_propseg.io.write_volume` / ``write_labels``.
WRITE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd")


def split_extension(name: str, endings: Sequence[str] = VOLUME_EXTENSIONS) -> tuple[str, str]:
    """``(stem, ending)``: ``name`` without the longest of ``endings`` it ends with.

    The match ignores case; ``ending`` is the entry of ``endings`` that matched (as given
    there), ``stem`` the rest of ``name`` as written. ``(name, "")`` when none matches.
    """
    low = name.lower()
    best = max((e for e in endings if e and low.endswith(e.lower())), key=len, default="")
    return (name[: -len(best)], best) if best else (name, "")
