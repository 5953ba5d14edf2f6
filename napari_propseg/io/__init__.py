"""CT input/output with true geometry (SimpleITK underneath, no Qt).

Every volume lives in memory in one orientation, **canonical LPS** (see
``docs/ARCHITECTURE.md``): ``array`` is (Z, Y, X) with x (last axis) running toward the
patient's Left, y toward Posterior and z (first axis) toward Superior. Reading a file
reorients its voxels to that layout by a pure permutation/flip of the array axes (no
interpolation), and records in :attr:`Volume.source` what is needed to put the voxels back
into the file's own layout; :func:`write_volume` and :func:`write_labels` do exactly that,
so a label file written by the tool has the same array layout, spacing, origin and
direction as the image it was drawn on.

Geometry conventions (ITK): ``direction`` is a 3x3 matrix whose column ``j`` is the
physical (x, y, z) LPS direction of the index axis ``j`` (ITK index order i, j, k = numpy
axes 2, 1, 0). ``origin`` is the physical LPS (x, y, z) position of the centre of voxel
``array[0, 0, 0]``; ``spacing`` is in array order (sz, sy, sx), millimetres.

Example:
    >>> vol = read_volume("ct.nii.gz")                 # doctest: +SKIP
    >>> labels = read_labels("seg.nrrd", like=vol)     # doctest: +SKIP
    >>> write_labels(labels.array, vol, "out.nii.gz")  # doctest: +SKIP

The package is split by concern; import from ``napari_propseg.io`` (every name below is
re-exported here):

* :mod:`.volume` -- :class:`Volume`, the extension lists and the geometry helpers;
* :mod:`.dicom_series` -- file sniffing, DICOM series discovery and reading;
* :mod:`.read` -- :func:`read_volume` (NIfTI / NRRD / MetaImage / DICOM checks,
  canonicalisation) and :func:`volume_info`;
* :mod:`.labels` -- label id types, grid comparison, :func:`read_labels`;
* :mod:`.write` -- :func:`write_volume`, :func:`write_labels` (file layout restored,
  atomic, verified);
* :mod:`._itk` -- SimpleITK plumbing shared by reading and writing.
"""
from __future__ import annotations

import logging

import SimpleITK as sitk  # noqa: F401  (napari_propseg.io.sitk, patched by tests)

from ..atomic import atomic_write, check_output_path  # noqa: F401
from ..errors import InputError, OutputError  # noqa: F401
from ._itk import (  # noqa: F401
    _lower_suffix,
    _first_line,
    _strip_itk_object,
    _c_stderr_to_log,
    _itk_warnings_off,
)
from .volume import (  # noqa: F401
    split_extension,
    VOLUME_EXTENSIONS,
    WRITE_EXTENSIONS,
    _SUPPORTED_TEXT,
    _POS_LETTERS,
    _NEG_LETTERS,
    _SPACING_RTOL,
    _ORIGIN_TOL_VOXELS,
    _DIRECTION_ATOL,
    MIN_LABEL_COVERAGE,
    Volume,
    _float3,
    _sitk_compatible,
    orientation_code,
    _closest_permutation,
    _make_source,
    _bounds,
)
from .dicom_series import (  # noqa: F401
    _is_dicom_file,
    _file_head,
    _has_dicm_preamble,
    _folder_has_dicom,
    is_readable_path,
    _dicom_tags,
    _dicom_tag,
    _check_folder,
    DICOM_SCAN_DEPTH,
    DICOM_SCAN_MAX_FOLDERS,
    _series_in,
    _child_folders,
    _iter_subfolders,
    _series_below,
    _merge_split_series,
    _slice_position,
    _series_files,
    list_dicom_series,
    _series_json,
    _read_dicom_series,
    _check_slice_spacing,
)
from .read import (  # noqa: F401
    _read_sitk,
    _KNOWN_MAGIC,
    _looks_like,
    _nifti_header_ok,
    _check_nifti_magic,
    _nifti_expected_bytes,
    _nifti_truncated,
    _check_image,
    _canonicalize,
    read_volume,
    volume_info,
    MAX_LABEL_IDS,
    label_ids_present,
)
from .labels import (  # noqa: F401
    label_dtype,
    _as_label_array,
    _same_grid,
    grid_difference,
    read_labels,
)
from .write import (  # noqa: F401
    _to_file_layout,
    _check_write_target,
    check_volume_output,
    _FULL_DISK_BYTES,
    _free_bytes,
    _short_write_error,
    _expected_data_bytes,
    _gzip_length,
    _verify_image_file,
    _atomic_write,
    _check_shape,
    write_volume,
    write_labels,
)

log = logging.getLogger(__name__)

__all__ = [
    "split_extension",
    "VOLUME_EXTENSIONS",
    "WRITE_EXTENSIONS",
    "MIN_LABEL_COVERAGE",
    "Volume",
    "orientation_code",
    "is_readable_path",
    "DICOM_SCAN_DEPTH",
    "DICOM_SCAN_MAX_FOLDERS",
    "list_dicom_series",
    "read_volume",
    "volume_info",
    "MAX_LABEL_IDS",
    "label_ids_present",
    "label_dtype",
    "grid_difference",
    "read_labels",
    "check_volume_output",
    "write_volume",
    "write_labels",
]
