"""`propseg info`: prints geometry and HU range; bad input exits 2 with one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from napari_propseg.cli import main


def test_info_on_dicom_folder(shared_data, capsys):
    rc = main(["info", str(shared_data / "totalseg_example" / "example_ct_dicom")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "20 x 512 x 512" in out
    assert "2 x 0.9766 x 0.9766 mm" in out
    assert "LPS" in out
    assert "-1024 .. 1839" in out
    assert "DICOM series found: 1" in out and "20 slices, CT Body 3.0" in out


def test_info_on_ras_nifti_json(shared_data, capsys):
    rc = main(["info", "--json", str(shared_data / "totalseg_example" / "example_ct.nii.gz")])
    info = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert info["shape"] == [112, 101, 122] and info["spacing"] == [3.0, 3.0, 3.0]
    assert info["orientation"] == "RAS" and info["series"] == []
    assert info["hu_min"] == -1207 and info["hu_max"] == 3382


def test_info_series_option(shared_data, capsys):
    folder = str(shared_data / "dcmqi_ct3slice" / "dicom")
    uid = "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1"
    assert main(["info", folder, "--series", uid]) == 0
    out = capsys.readouterr().out
    assert "3 x 512 x 512" in out and f"* {uid}: 3 slices" in out
    assert main(["info", folder, "--series", "1.2.3.4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1.2.3.4" in err[0] and uid in err[0]


def test_info_small_nrrd(tmp_path, capsys):
    arr = np.zeros((3, 8, 8), np.int16)
    arr[1] = 100
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "v.nrrd"))
    assert main(["info", str(tmp_path / "v.nrrd")]) == 0
    assert "0 .. 100 (int16)" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["missing.nii.gz", "flat.nrrd", "empty_dir", "bad.png"])
def test_info_bad_input_exits_2_with_one_line(tmp_path, capsys, name):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.int16)), str(tmp_path / "flat.nrrd"))
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG")
    rc = main(["info", str(tmp_path / name)])
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("propseg info: error: ") and name in lines[0]
    assert captured.out == ""


def test_info_process_has_no_traceback(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "napari_propseg", "info", str(tmp_path / "nothing_here.nii.gz")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"propseg info: error: {tmp_path / 'nothing_here.nii.gz'} does not exist; check the path."
    ]
