"""The core never imports Qt, napari or magicgui; every manifest python_name imports."""
from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import napari_propseg

REPO = Path(__file__).resolve().parent.parent
UI_MODULES = {"napari_propseg._reader", "napari_propseg._writer", "napari_propseg._sample_data", "napari_propseg._widget"}
FORBIDDEN = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "vispy", "superqt")


def core_modules() -> list[str]:
    mods = [m.name for m in pkgutil.walk_packages(napari_propseg.__path__, "napari_propseg.")]
    return sorted(m for m in mods if m not in UI_MODULES and not m.endswith("__main__")
                  and not any(m.startswith(ui + ".") for ui in UI_MODULES))  # the widget is a package


def test_core_module_list_is_not_empty():
    mods = core_modules()
    for expected in ("napari_propseg.io", "napari_propseg.session", "napari_propseg.preprocess", "napari_propseg.cli"):
        assert expected in mods


@pytest.mark.slow
def test_core_imports_no_gui_toolkit():
    code = (
        "import importlib, sys, json\n"
        f"mods = {core_modules()!r}\n"
        "for m in mods: importlib.import_module(m)\n"
        f"bad = sorted(k for k in sys.modules if k.split('.')[0] in {FORBIDDEN!r})\n"
        "print(json.dumps(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, cwd=str(REPO))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", f"core imported GUI modules: {out.stdout}"


@pytest.mark.slow
def test_ui_module_imports_gui_so_the_check_can_fail():
    """Sanity check of the detector itself: the widget module does pull in Qt."""
    code = "import sys, napari_propseg._widget; print('qtpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=str(REPO))
    if out.returncode != 0:
        pytest.skip(f"widget module not importable here: {out.stderr[-300:]}")
    assert out.stdout.strip() == "True"


def test_every_manifest_python_name_imports():
    manifest = yaml.safe_load((REPO / "napari.yaml").read_text())
    names = [c["python_name"] for c in manifest["contributions"]["commands"]]
    assert len(names) >= 4
    for name in names:
        mod, attr = name.split(":")
        assert callable(getattr(importlib.import_module(mod), attr)), name
