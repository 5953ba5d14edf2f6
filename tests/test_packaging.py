"""The wheel holds the top-level npe2 manifest (a real file, same content) and its entry point."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                "outputs", "runs", ".whl", ".devdata", "models", "benchmarks", "docs")


@pytest.mark.slow
def test_wheel_contains_top_level_manifest(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=IGNORE)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
         str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    [wheel] = list((tmp_path / "dist").glob("napari_propseg-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "napari_propseg/napari.yaml" in names
        info = zf.getinfo("napari_propseg/napari.yaml")
        assert (info.external_attr >> 28) != 0xA, "the wheel must hold a real file, not a symlink"
        assert zf.read("napari_propseg/napari.yaml").decode() == (REPO / "napari.yaml").read_text()
        [ep] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = zf.read(ep).decode()
    assert "[napari.manifest]" in entry_points
    assert "napari-propseg = napari_propseg:napari.yaml" in entry_points
    assert "propseg = napari_propseg.cli:main" in entry_points
    assert not any(n.startswith("tests/") for n in names)
