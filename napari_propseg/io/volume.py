"""The in-memory volume (:class:`Volume`, canonical LPS) and its geometry helpers.

Part of :mod:`napari_propseg.io`; import the public names from there."""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..filenames import VOLUME_EXTENSIONS, WRITE_EXTENSIONS, split_extension  # noqa: F401  (re-exported)

_SUPPORTED_TEXT = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series folder"
_POS_LETTERS = ("L", "P", "S")  # index axis runs toward +x, +y, +z (LPS)
_NEG_LETTERS = ("R", "A", "I")
# Tolerances for "same grid": geometry read from different formats differs by float32
# rounding (NIfTI header) or by DICOM slice-position arithmetic (~1e-14 mm).
_SPACING_RTOL = 1e-4
_ORIGIN_TOL_VOXELS = 1e-2
_DIRECTION_ATOL = 1e-4
#: Fraction of the image's extent (along each physical axis) a label file on another
#: grid must cover to be resampled rather than refused.
MIN_LABEL_COVERAGE = 0.9


# --------------------------------------------------------------------------- Volume


@dataclass
class Volume:
    """A 3-D image in canonical LPS with its physical geometry.

    Attributes:
        array: (Z, Y, X) voxels, canonical LPS (x -> Left, y -> Posterior, z -> Superior).
        spacing: (sz, sy, sx) voxel size in mm, array order.
        origin: physical LPS (x, y, z) in mm of the centre of ``array[0, 0, 0]``.
        direction: (3, 3) ITK direction (column j = physical x, y, z direction of index
            axis j, i.e. of numpy axis 2 - j). The identity for axis-aligned files; a
            near-identity residual rotation for oblique ones.
        path: the file or DICOM folder read, if any.
        source: what :func:`write_volume` needs to restore the file's own layout
            (original array shape, axis permutation and flips, spacing, origin,
            direction, orientation code). Plain Python types only.
        meta: free-form (series UID, notices, label names, ...).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    path: str | None = None
    source: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_array(
        cls,
        array: np.ndarray,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        origin: Sequence[float] = (0.0, 0.0, 0.0),
        *,
        path: str | None = None,
        meta: dict | None = None,
    ) -> "Volume":
        """Wrap an array that is already in canonical LPS (identity direction).

        Args:
            array: (Z, Y, X) voxels, canonical LPS.
            spacing: (sz, sy, sx) in mm.
            origin: physical LPS (x, y, z) of ``array[0, 0, 0]`` in mm.
            path: optional file the array stands for.
            meta: optional free-form metadata.

        Returns:
            A Volume whose file orientation is LPS (written files are LPS too).
        """
        array = np.asarray(array)
        if array.ndim != 3:
            raise ValueError(f"Volume.from_array needs a (Z, Y, X) array, got shape {array.shape}")
        spacing_t = _float3(spacing, "spacing")
        origin_t = _float3(origin, "origin")
        if min(spacing_t) <= 0:
            raise ValueError(f"spacing must be positive, got {spacing_t}")
        direction = np.eye(3)
        source = _make_source(
            file_shape=array.shape,
            perm=(0, 1, 2),
            signs=(1, 1, 1),
            itk_spacing=spacing_t[::-1],
            itk_origin=origin_t,
            itk_direction=direction,
        )
        return cls(array, spacing_t, origin_t, direction, path, source, dict(meta or {}))

    def like(self, array: np.ndarray) -> "Volume":
        """A new Volume with this one's geometry and file layout and another array.

        Args:
            array: (Z, Y, X) array of the same shape as ``self.array``, canonical LPS.

        Returns:
            Volume sharing spacing/origin/direction/source (copied) and a copy of ``meta``
            without its ``notice``.
        """
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ValueError(f"Volume.like: array shape {array.shape} differs from the volume's {self.array.shape}")
        meta = {k: v for k, v in self.meta.items() if k != "notice"}
        return Volume(
            array,
            self.spacing,
            self.origin,
            np.array(self.direction, dtype=float, copy=True),
            self.path,
            copy.deepcopy(self.source),
            meta,
        )

    # ------------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, Y, X) shape of the canonical array."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Three-letter code of the ORIGINAL file's orientation (e.g. 'LPS', 'LAS', 'RAS').

        Letter ``k`` says toward which patient side the file's index axis ``k`` (i, j, k
        = x, y, z storage order) runs (nibabel/"toward" convention).
        """
        return str(self.source.get("orientation", "LPS"))

    def to_sitk(self, array: np.ndarray | None = None) -> sitk.Image:
        """This volume (or ``array`` on its grid) as a SimpleITK image in canonical layout.

        Args:
            array: optional (Z, Y, X) array of the same shape; defaults to ``self.array``.

        Returns:
            sitk.Image with size (X, Y, Z), spacing (sx, sy, sz), this origin and direction.
        """
        arr = self.array if array is None else np.asarray(array)
        if arr.shape != self.array.shape:
            raise ValueError(f"array shape {arr.shape} differs from the volume's {self.array.shape}")
        img = sitk.GetImageFromArray(_sitk_compatible(arr))
        img.SetSpacing(tuple(float(s) for s in self.spacing[::-1]))
        img.SetOrigin(tuple(float(o) for o in self.origin))
        img.SetDirection(tuple(float(d) for d in np.asarray(self.direction, dtype=float).ravel()))
        return img

    def to_metadata(self) -> dict[str, Any]:
        """Geometry as plain Python types (for a napari layer's ``metadata``), no array.

        :meth:`from_metadata` rebuilds a Volume on the same grid from it, so a Labels layer
        drawn on an image layer can be written back onto the image file's grid.
        """
        return {
            "spacing": [float(s) for s in self.spacing],
            "origin": [float(o) for o in self.origin],
            "direction": [float(v) for v in np.asarray(self.direction, float).ravel()],
            "path": self.path,
            "source": copy.deepcopy(self.source),
        }

    @classmethod
    def from_metadata(cls, array: np.ndarray, metadata: dict[str, Any]) -> "Volume":
        """Volume with ``array`` (Z, Y, X) and the geometry from :meth:`to_metadata`.

        Raises:
            InputError: ``metadata`` lacks geometry, or ``array``'s shape does not match it.
        """
        try:
            spacing = _float3(metadata["spacing"], "spacing")
            origin = _float3(metadata["origin"], "origin")
            direction = np.asarray(metadata["direction"], dtype=float).reshape(3, 3)
            source = copy.deepcopy(dict(metadata.get("source") or {}))
        except (KeyError, TypeError, ValueError):
            raise InputError("The layer carries no CT geometry (spacing, origin, direction); open the image with napari-propseg's reader.") from None
        array = np.asarray(array)
        if source.get("file_shape") is not None and array.ndim == 3:
            perm = source["perm"]
            expected = [source["file_shape"][2 - perm[2 - b]] for b in range(3)]
            if list(array.shape) != expected:
                raise InputError(f"Array shape {array.shape} does not match the image grid {tuple(expected)}; draw the labels on the image they belong to.")
        return cls(array, spacing, origin, direction, metadata.get("path"), source, {})

    def physical_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned physical bounding box (x, y, z) of the voxels' outer faces, in mm."""
        return _bounds(
            np.asarray(self.origin, float),
            np.asarray(self.spacing[::-1], float),
            np.asarray(self.direction, float),
            np.asarray(self.array.shape[::-1], float),
        )


# --------------------------------------------------------------------------- helpers


def _float3(values: Sequence[float], what: str) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in values)
    if len(vals) != 3:
        raise ValueError(f"{what} needs 3 values, got {values!r}")
    return vals  # type: ignore[return-value]


def _sitk_compatible(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype == np.float16:
        return arr.astype(np.float32)
    return np.ascontiguousarray(arr)


def orientation_code(direction: np.ndarray) -> str:
    """Three-letter "toward" orientation code of an ITK direction matrix (e.g. 'LPS').

    Args:
        direction: (3, 3), column j = physical direction of index axis j.
    """
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    perm, signs = _closest_permutation(d)
    letters = [""] * 3
    for p in range(3):
        j = perm[p]
        letters[j] = _POS_LETTERS[p] if signs[p] > 0 else _NEG_LETTERS[p]
    return "".join(letters)


def _closest_permutation(d: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """For each physical axis p, the index axis perm[p] closest to it and its sign.

    Picks the permutation maximising sum |d[p, perm[p]]| (exact for any rotation,
    including oblique ones, where a greedy per-axis choice could pick one axis twice).
    """
    best = max(itertools.permutations(range(3)), key=lambda pm: sum(abs(d[p, pm[p]]) for p in range(3)))
    signs = tuple(1 if d[p, best[p]] >= 0 else -1 for p in range(3))
    return tuple(best), signs  # type: ignore[return-value]


def _make_source(*, file_shape, perm, signs, itk_spacing, itk_origin, itk_direction) -> dict:
    direction = np.asarray(itk_direction, dtype=float).reshape(3, 3)
    return {
        "file_shape": [int(s) for s in file_shape],  # numpy (k, j, i) shape of the file's array
        "perm": [int(p) for p in perm],  # canonical ITK axis p <- file ITK axis perm[p]
        "flip": [bool(s < 0) for s in signs],  # canonical ITK axis p is reversed
        "spacing": [float(s) for s in itk_spacing],  # file's ITK (x, y, z) order
        "origin": [float(o) for o in itk_origin],
        "direction": [float(v) for v in direction.ravel()],
        "orientation": orientation_code(direction),
    }


def _bounds(origin, spacing_xyz, direction, size_xyz) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned box (lo, hi), physical (x, y, z), around the voxel faces."""
    corners = np.array(list(itertools.product((0, 1), repeat=3)))
    # continuous index of the outer faces: -0.5 and size - 0.5
    idx = np.where(corners == 0, -0.5, size_xyz[None, :] - 0.5)
    pts = origin[None, :] + (idx * spacing_xyz[None, :]) @ direction.T
    return pts.min(axis=0), pts.max(axis=0)
