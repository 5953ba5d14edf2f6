"""Writing volumes and label files back in the source file's own layout, atomically and
verified (:func:`write_volume`, :func:`write_labels`).

Part of :mod:`napari_propseg.io`; import the public names from there."""
from __future__ import annotations

import errno
import gzip
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ..atomic import atomic_write, check_output_path
from ..errors import InputError, OutputError
from ._itk import _c_stderr_to_log, _first_line, _lower_suffix
from .labels import _as_label_array
from .read import _nifti_expected_bytes
from .volume import _sitk_compatible, Volume, WRITE_EXTENSIONS

log = logging.getLogger("napari_propseg.io")  # one logger for the io package

# --------------------------------------------------------------------------- writing


def _to_file_layout(array: np.ndarray, like: Volume) -> sitk.Image:
    """Undo the canonicalisation: canonical (Z, Y, X) -> the file's own array + geometry."""
    src = like.source or Volume.from_array(like.array, like.spacing, like.origin).source
    if not src.get("perm"):
        raise ValueError("Volume.source lacks the file layout; build volumes with read_volume or Volume.from_array")
    perm = src["perm"]
    flip = src["flip"]
    flip_np = [b for b in range(3) if flip[2 - b]]
    out = np.flip(array, axis=flip_np) if flip_np else array
    axes = [2 - perm[2 - b] for b in range(3)]  # canonical np axis b <- file np axis axes[b]
    out = np.transpose(out, np.argsort(axes))
    if list(out.shape) != list(src["file_shape"]):
        raise ValueError(f"layout mismatch: {out.shape} vs file shape {src['file_shape']}")
    img = sitk.GetImageFromArray(_sitk_compatible(np.ascontiguousarray(out)))
    img.SetSpacing(tuple(src["spacing"]))
    img.SetOrigin(tuple(src["origin"]))
    img.SetDirection(tuple(src["direction"]))
    return img


def _check_write_target(path: Path) -> str:
    suffix = _lower_suffix(path)
    if suffix not in WRITE_EXTENSIONS:
        raise InputError(
            f"Cannot write {path.name}: unsupported file type {suffix or '(no extension)'!r}; "
            "use .nii.gz, .nii or .nrrd."
        )
    if path.is_dir():
        raise OutputError(f"Cannot write {path}: it is a folder; give a file name ending in .nii.gz or .nrrd.")
    return suffix


def check_volume_output(path: str | os.PathLike, *, inputs: Sequence = (), what: str = "label file") -> Path:
    """Check, before any work, that a label/image file can be written at ``path``.

    The extension must be one of :data:`WRITE_EXTENSIONS`, the folder must exist and be
    writable and ``path`` must not be one of ``inputs`` (see
    :func:`napari_propseg.atomic.check_output_path`).

    Raises:
        InputError: unsupported extension; OutputError: folder missing or read-only, or
            ``path`` is an input.
    """
    p = Path(path).expanduser()
    _check_write_target(p)
    return check_output_path(p, inputs=tuple(inputs), what=what)


#: Below this many free bytes on the output's file system a short write is put down to a
#: full disk.
_FULL_DISK_BYTES = 1 << 20


def _free_bytes(folder: Path) -> int | None:
    """Bytes free for this user on ``folder``'s file system (None if unknown)."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return int(st.f_bavail) * int(st.f_frsize)


def _free_now(folder: Path) -> int | None:
    """:func:`_free_bytes`, looked up on :mod:`napari_propseg.io` at call time, so that
    replacing ``napari_propseg.io._free_bytes`` (the tests simulate a full disk so) works."""
    from . import _free_bytes as free_bytes

    return free_bytes(folder)


def _short_write_error(folder: Path, detail: str) -> OSError:
    """The OSError for an image file that came out incomplete: a full disk when little is free."""
    free = _free_now(folder)
    if free is not None and free < _FULL_DISK_BYTES:
        return OSError(errno.ENOSPC, "the disk is full")
    return OSError(errno.EIO, f"the written file came out incomplete ({detail}; is the disk full or over quota?)")


def _expected_data_bytes(img: sitk.Image) -> int:
    n = int(np.prod(img.GetSize(), dtype=np.int64))
    return n * int(img.GetNumberOfComponentsPerPixel()) * int(img.GetSizeOfPixelComponent())


def _gzip_length(path: Path, offset: int = 0) -> int:
    """Uncompressed length of the complete gzip stream(s) from ``offset``; raises EOFError
    / zlib.error / gzip.BadGzipFile when the stream is cut short or damaged (the CRC and
    length in the gzip trailer are checked)."""
    total = 0
    with open(path, "rb") as raw:
        raw.seek(offset)
        with gzip.GzipFile(fileobj=raw, mode="rb") as fh:
            while chunk := fh.read(1 << 22):
                total += len(chunk)
    return total


def _verify_image_file(tmp: Path, suffix: str, img: sitk.Image) -> None:
    """Check that the file ITK wrote holds all of ``img`` (its writers can stop short
    without raising, e.g. NIfTI on a full disk); raises OSError otherwise."""
    data = _expected_data_bytes(img)
    folder = tmp.parent
    try:
        if suffix in (".nii", ".nii.gz"):
            if suffix == ".nii.gz":
                with gzip.open(tmp, "rb") as fh:
                    header = fh.read(540)
            else:
                with open(tmp, "rb") as fh:
                    header = fh.read(540)
            expected = _nifti_expected_bytes(header)
            if expected is None or expected - data < 348:
                raise _short_write_error(folder, "its header is missing or damaged")
            have = _gzip_length(tmp) if suffix == ".nii.gz" else tmp.stat().st_size
            if have < expected:
                raise _short_write_error(folder, f"{have} of {expected} bytes")
        elif suffix == ".nrrd":
            with open(tmp, "rb") as fh:
                head = fh.read(1 << 16)
            end = head.find(b"\n\n")
            if not head.startswith(b"NRRD") or end < 0:
                raise _short_write_error(folder, "its header is missing or damaged")
            fields = dict(
                (k.strip().lower(), v.strip())
                for k, _, v in (ln.partition(":") for ln in head[:end].decode("latin-1").splitlines()[1:])
            )
            offset = end + 2
            encoding = fields.get("encoding", "raw").lower()
            if encoding in ("gzip", "gz"):
                have = _gzip_length(tmp, offset)
            elif encoding == "raw":
                have = tmp.stat().st_size - offset
            else:
                return
            if have < data:
                raise _short_write_error(folder, f"{have} of {data} data bytes")
    except (EOFError, zlib.error, gzip.BadGzipFile, struct.error) as exc:
        raise _short_write_error(folder, f"its compressed data ends early ({exc.__class__.__name__})") from None


def _atomic_write(img: sitk.Image, path: Path, suffix: str, what: str = "label file") -> None:
    """Write ``img`` to ``path`` through :func:`napari_propseg.atomic.atomic_write`: a
    temporary file beside it, checked to hold every voxel, then renamed over ``path``.

    Raises:
        OutputError: one sentence (the disk is full, read-only folder, ...); an existing
            file at ``path`` is left as it was and no temporary file remains.
    """

    def write(tmp: Path) -> None:
        try:
            with _c_stderr_to_log():
                sitk.WriteImage(img, str(tmp), useCompression=(suffix in (".nrrd", ".nii.gz")))
        except RuntimeError as exc:
            log.debug("SimpleITK could not write %s: %s", path, exc)
            free = _free_now(tmp.parent)
            if free is not None and free < _FULL_DISK_BYTES:
                raise OSError(errno.ENOSPC, "the disk is full") from None
            raise OSError(errno.EIO, f"the image writer failed ({_first_line(exc)})") from None

    atomic_write(path, write, verify=lambda tmp: _verify_image_file(tmp, suffix, img), suffix=suffix, what=what)
    log.info("wrote %s", path)


def _check_shape(array: np.ndarray, like: Volume, what: str) -> None:
    if array.ndim != 3 or array.shape != like.array.shape:
        raise InputError(
            f"{what} has shape {tuple(array.shape)} but the image has shape {like.shape}; "
            "they must be drawn on the same (Z, Y, X) grid."
        )


def write_volume(array: np.ndarray, like: Volume, path: str | os.PathLike, *, what: str = "image") -> Path:
    """Write ``array`` on ``like``'s grid, in ``like``'s original file layout, atomically.

    Args:
        array: (Z, Y, X) canonical-LPS array of ``like``'s shape (any numeric type).
        like: the volume whose geometry and file orientation are restored.
        path: ``.nii.gz``, ``.nii`` or ``.nrrd`` (the extension picks the format).
        what: what the file is, for error messages.

    Returns:
        The path written.

    Raises:
        InputError: unsupported extension, shape mismatch; OutputError (an InputError):
            missing or read-only folder, full disk or any other write failure (the old
            file, if any, is left untouched and no partial or temporary file remains).
    """
    p = Path(path).expanduser()
    suffix = _check_write_target(p)
    arr = np.asarray(array)
    _check_shape(arr, like, "The array to write")
    check_output_path(p, what=what)
    _atomic_write(_to_file_layout(arr, like), p, suffix, what=what)
    return p


def write_labels(labels: np.ndarray | Volume, like: Volume, path: str | os.PathLike, *, what: str = "label file") -> Path:
    """Write an integer label volume on ``like``'s grid and original file layout, atomically.

    Args:
        labels: (Z, Y, X) canonical-LPS label ids (or a Volume), 0 = background;
            float arrays must hold whole numbers.
        like: the image the labels were drawn on.
        path: ``.nii.gz``, ``.nii`` or ``.nrrd``.
        what: what the file is, for error messages.

    Returns:
        The path written. The file's pixel type is uint8, uint16 or int32, the narrowest
        that holds the largest id. An all-background volume is written too, with a
        warning in the log.

    Raises:
        InputError: as :func:`write_volume`, plus negative or non-integral ids.
    """
    p = Path(path).expanduser()
    suffix = _check_write_target(p)
    arr = labels.array if isinstance(labels, Volume) else np.asarray(labels)
    _check_shape(arr, like, "The label volume")
    arr = _as_label_array(arr, "The label volume")
    check_output_path(p, what=what)
    _atomic_write(_to_file_layout(arr, like), p, suffix, what=what)
    if not arr.any():
        log.warning("%s holds no label (every voxel is background)", p)
    return p
