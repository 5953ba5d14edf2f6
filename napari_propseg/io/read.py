"""Reading an image file or DICOM folder into a canonical :class:`~napari_propseg.io.Volume`
(NIfTI/NRRD/MetaImage/DICOM checks, canonicalisation, :func:`volume_info`).

Part of :mod:`napari_propseg.io`; import the public names from there."""
from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ._itk import _lower_suffix
from .dicom_series import _dicom_tag, _file_head, _has_dicm_preamble, _read_dicom_series
from .volume import _closest_permutation, _DIRECTION_ATOL, _make_source, _SUPPORTED_TEXT, Volume, VOLUME_EXTENSIONS

log = logging.getLogger("napari_propseg.io")  # one logger for the io package

# --------------------------------------------------------------------------- reading


def _read_sitk(path: Path, series_uid: str | None) -> tuple[sitk.Image, dict]:
    """Read ``path`` (file or DICOM folder) into a 3-D scalar sitk image, or raise InputError."""
    if not path.exists():
        raise InputError(f"{path} does not exist; check the path.")
    meta: dict[str, Any] = {}
    if path.is_dir():
        img, meta = _read_dicom_series(path, series_uid)
    else:
        suffix = _lower_suffix(path)
        if suffix not in VOLUME_EXTENSIONS:
            raise InputError(
                f"{path.name} has an unsupported file type {suffix or '(no extension)'!r}; "
                f"napari-propseg reads {_SUPPORTED_TEXT}."
            )
        if suffix == ".dcm":
            # A single DICOM file stands for its series: read the series it belongs to.
            uid = series_uid if series_uid is not None else _dicom_tag(str(path), "0020|000e")
            if not uid and not _has_dicm_preamble(path):
                head = _file_head(path, 132)
                raise InputError(f"{path} is not a DICOM file{_looks_like(head)}; pass a DICOM file of a CT series, its folder or a CT file.")
            return _read_sitk(path.parent, uid)
        try:
            if path.stat().st_size == 0:
                raise InputError(f"{path} is empty (0 bytes); the file is incomplete, copy or export it again.")
        except OSError as exc:
            raise InputError(f"Cannot access {path} ({exc.strerror}); check its permissions.") from None
        if suffix in (".nii", ".nii.gz"):
            _check_nifti_magic(path, suffix)
        try:
            img = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            log.debug("SimpleITK could not read %s: %s", path, exc)
            raise InputError(
                f"Cannot read {path}: the file is damaged, truncated or not a {suffix} image; export it again."
            ) from None
        if suffix in (".nii", ".nii.gz") and _nifti_truncated(path):
            # ITK's NIfTI reader pads missing voxel data silently; refuse instead.
            raise InputError(f"{path} is truncated (its voxel data ends early); copy or export the file again.")
    _check_image(img, path)
    if img.GetDimension() == 4:
        img = sitk.Extract(img, list(img.GetSize()[:3]) + [0], [0, 0, 0, 0])
    return img, meta


#: Leading bytes of formats that get renamed to .nii.gz by mistake, for the error message.
_KNOWN_MAGIC = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"NRRD", "an NRRD file"),
    (b"ObjectType", "a MetaImage header"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"%PDF", "a PDF document"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"BM", "a BMP image"),
)


def _looks_like(head: bytes) -> str:
    if len(head) >= 132 and head[128:132] == b"DICM":
        return " (it is a DICOM file)"
    for magic, name in _KNOWN_MAGIC:
        if head.startswith(magic):
            return f" (it is {name})"
    return ""


def _nifti_header_ok(header: bytes) -> bool:
    """True for a NIfTI-1/NIfTI-2 (or Analyze 7.5, sizeof_hdr 348) header."""
    if len(header) < 4:
        return False
    for endian in ("<", ">"):
        (hsize,) = struct.unpack(endian + "i", header[:4])
        if hsize in (348, 540):
            return True
    return False


def _check_nifti_magic(path: Path, suffix: str) -> None:
    """InputError when a .nii/.nii.gz file is not NIfTI at all (e.g. a PNG renamed), before
    ITK (which picks its reader by content) reads it as something else or calls it damaged.
    A file that starts right but ends early is left to the truncation check."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(540)
    except OSError as exc:
        raise InputError(f"Cannot access {path} ({exc.strerror}); check its permissions.") from None
    gz = head[:2] == b"\x1f\x8b"
    if suffix == ".nii.gz" and not gz:
        if _nifti_header_ok(head):
            return  # an uncompressed NIfTI file named .nii.gz: ITK reads it
        raise InputError(f"{path} is not a NIfTI file{_looks_like(head)}: a .nii.gz file must be a gzip-compressed NIfTI image; "
                         "pass the image in a format napari-propseg reads or export it as NIfTI again.")
    if gz:
        try:
            with gzip.open(path, "rb") as fh:
                head = fh.read(540)
        except (OSError, EOFError, zlib.error):
            return  # damaged or cut short: the truncation check says so
        if len(head) < 4:
            return
    if not _nifti_header_ok(head):
        raise InputError(f"{path} is not a NIfTI file{_looks_like(head)}: it has no NIfTI header; "
                         "pass the image in a format napari-propseg reads or export it as NIfTI again.")


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Bytes a NIfTI-1/2 file must hold (voxel offset + data), from its header; None if unknown."""
    for endian in ("<", ">"):
        (hsize,) = struct.unpack(endian + "i", header[:4])
        if hsize == 348 and len(header) >= 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            (bitpix,) = struct.unpack(endian + "h", header[72:74])
            (offset,) = struct.unpack(endian + "f", header[108:112])
            break
        if hsize == 540 and len(header) >= 540:
            (bitpix,) = struct.unpack(endian + "h", header[12:14])
            dims = struct.unpack(endian + "8q", header[16:80])
            (offset,) = struct.unpack(endian + "q", header[168:176])
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    nvox = int(np.prod([max(int(d), 1) for d in dims[1 : ndim + 1]], dtype=np.int64))
    return int(max(offset, 348 if hsize == 348 else 540)) + nvox * bitpix // 8


def _nifti_truncated(path: Path) -> bool:
    """True if a .nii/.nii.gz file holds fewer bytes than its header promises."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                header = fh.read(540)
            expected = _nifti_expected_bytes(header)
            if expected is None:
                return False
            # Cheap check first: the gzip trailer stores the uncompressed size mod 2**32.
            with open(path, "rb") as fh:
                fh.seek(-4, os.SEEK_END)
                (isize,) = struct.unpack("<I", fh.read(4))
            if isize == expected % 2**32:
                return False
            total = 0  # trailer disagrees (multi-member or extension data?): decompress to be sure
            with gzip.open(path, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    total += len(chunk)
            return total < expected
        with open(path, "rb") as fh:
            header = fh.read(540)
        expected = _nifti_expected_bytes(header)
        return expected is not None and path.stat().st_size < expected
    except (OSError, EOFError, gzip.BadGzipFile, struct.error, zlib.error):
        return True


def _check_image(img: sitk.Image, path: Path) -> None:
    ncomp = img.GetNumberOfComponentsPerPixel()
    if ncomp > 1:
        raise InputError(
            f"{path} is a colour/vector image ({ncomp} components per voxel); napari-propseg needs a "
            "single-channel CT volume in Hounsfield units."
        )
    if "complex" in img.GetPixelIDTypeAsString():
        raise InputError(f"{path} holds complex numbers; napari-propseg needs a real-valued CT volume.")
    dim = img.GetDimension()
    size = img.GetSize()
    if dim == 2 or (dim == 3 and min(size) == 1):
        raise InputError(f"{path} is a 2-D image (size {'x'.join(map(str, size))}); napari-propseg needs a 3-D CT volume.")
    if dim == 4 and size[3] != 1:
        raise InputError(
            f"{path} is a 4-D volume ({'x'.join(map(str, size))}, e.g. a time series); "
            "extract one 3-D volume from it first."
        )
    if dim not in (3, 4):
        raise InputError(f"{path} is a {dim}-D image; napari-propseg needs a 3-D CT volume.")
    if dim == 4 and min(size[:3]) == 1:
        raise InputError(f"{path} is a 2-D image (size {'x'.join(map(str, size))}); napari-propseg needs a 3-D CT volume.")


def _canonicalize(img: sitk.Image, path: str | None, meta: dict) -> Volume:
    """Reorient a 3-D sitk image to canonical LPS by axis permutation and flips only."""
    arr = sitk.GetArrayFromImage(img)  # numpy (k, j, i)
    d = np.array(img.GetDirection(), dtype=float).reshape(3, 3)
    sp = np.array(img.GetSpacing(), dtype=float)
    org = np.array(img.GetOrigin(), dtype=float)
    size = np.array(img.GetSize(), dtype=float)
    perm, signs = _closest_permutation(d)

    # canonical ITK axis p <- file ITK axis perm[p]; numpy axis b = ITK axis 2 - b.
    axes = [2 - perm[2 - b] for b in range(3)]
    out = np.transpose(arr, axes)
    flip_np = [b for b in range(3) if signs[2 - b] < 0]
    if flip_np:
        out = np.flip(out, axis=flip_np)
    out = np.ascontiguousarray(out)

    new_dir = np.empty((3, 3))
    first_idx = np.zeros(3)
    for p in range(3):
        new_dir[:, p] = d[:, perm[p]] * signs[p]
        if signs[p] < 0:
            first_idx[perm[p]] = size[perm[p]] - 1
    new_dir += 0.0  # no negative zeros
    new_origin = org + d @ (sp * first_idx)
    new_sp_xyz = [sp[perm[p]] for p in range(3)]
    source = _make_source(
        file_shape=arr.shape, perm=perm, signs=signs, itk_spacing=sp, itk_origin=org, itk_direction=d
    )
    return Volume(
        array=out,
        spacing=tuple(float(s) for s in new_sp_xyz[::-1]),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in new_origin),  # type: ignore[arg-type]
        direction=new_dir,
        path=path,
        source=source,
        meta=meta,
    )


def read_volume(path: str | os.PathLike, *, series_uid: str | None = None) -> Volume:
    """Read a CT volume (NIfTI, NRRD, MHA/MHD, DICOM series folder) into canonical LPS.

    Args:
        path: image file, or folder of a DICOM series (a single ``.dcm`` file stands for
            its series). With several series in a folder the one with most slices is read
            and ``meta['notice']`` lists the others.
        series_uid: SeriesInstanceUID of the DICOM series to read instead.

    Returns:
        Volume with ``array`` (Z, Y, X) in the file's pixel type (HU for CT, rescale
        slope/intercept applied for DICOM) and ``meta`` holding ``series`` (list of dicts
        from :func:`list_dicom_series`) and ``series_uid`` for DICOM input.

    Raises:
        InputError: missing path, unsupported extension, unreadable/truncated file,
            2-D, colour/vector or 4-D image, empty folder, folder without DICOM.
    """
    p = Path(path).expanduser()
    img, meta = _read_sitk(p, series_uid)
    vol = _canonicalize(img, str(p), meta)
    log.info("read %s: shape %s, spacing %s, file orientation %s", p, vol.shape, vol.spacing, vol.orientation)
    return vol


def volume_info(vol: Volume) -> dict[str, Any]:
    """Summary of a volume for display (``propseg info``).

    Returns:
        dict with ``path``, ``shape`` (Z, Y, X), ``spacing`` (sz, sy, sx) mm, ``origin``
        (x, y, z) mm, ``orientation`` (file's code), ``dtype``, ``hu_min``, ``hu_max``,
        ``series`` (list of series dicts, empty for a file), ``series_uid``, ``notice``
        and ``label_ids``: the ids present when the volume looks like a label file (whole
        numbers >= 0, at most :data:`MAX_LABEL_IDS` distinct values), else None.
    """
    arr = vol.array
    finite = arr if np.issubdtype(arr.dtype, np.integer) else arr[np.isfinite(arr)]
    return {
        "path": vol.path,
        "shape": vol.shape,
        "spacing": tuple(float(s) for s in vol.spacing),
        "origin": tuple(float(o) for o in vol.origin),
        "orientation": vol.orientation,
        "oblique": bool(not np.allclose(vol.direction, np.eye(3), atol=_DIRECTION_ATOL)),
        "dtype": str(arr.dtype),
        "hu_min": float(finite.min()) if finite.size else float("nan"),
        "hu_max": float(finite.max()) if finite.size else float("nan"),
        "series": list(vol.meta.get("series", [])),
        "series_uid": vol.meta.get("series_uid"),
        "notice": vol.meta.get("notice"),
        "label_ids": label_ids_present(arr),
    }


#: A volume with at most this many distinct whole-number values >= 0 is taken for a
#: label file by :func:`volume_info` (a CT in HU has thousands of values, and negative ones).
MAX_LABEL_IDS = 256


def label_ids_present(arr: np.ndarray) -> list[int] | None:
    """The distinct values of ``arr`` when it looks like a label volume (integer type,
    values 0..65535, at most :data:`MAX_LABEL_IDS` of them); None otherwise."""
    arr = np.asarray(arr)
    if arr.dtype == bool:
        return sorted({int(v) for v in np.unique(arr)})
    if not np.issubdtype(arr.dtype, np.integer) or arr.size == 0:
        return None
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > 65535:
        return None
    flat = arr.reshape(-1)
    counts = np.zeros(hi + 1, dtype=np.int64)
    step = 1 << 22  # in chunks: no full-size int64 copy of a large CT
    for i in range(0, flat.size, step):
        counts += np.bincount(flat[i : i + step], minlength=hi + 1)
    ids = np.flatnonzero(counts)
    return [int(i) for i in ids] if ids.size <= MAX_LABEL_IDS else None
