"""Organ names and colours in napari (issue #14's last section): the Labels layer's
features (hover shows the organ), its colour map, the dock's legend, and the Export
dialog's formats with the label map JSON beside the written file."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from test_widget_gui import (  # noqa: E402,F401 - fixtures and helpers shared with the GUI tests
    SMALL,
    _display_or_skip,
    _napari_settings_in_memory,
    _paint_slice,
    viewer_widget,
)

from napari_propseg.labelcolors import label_color  # noqa: E402
from napari_propseg.labelmap import FLARE_NAMES  # noqa: E402

pytestmark = pytest.mark.gui


def _hover(viewer, layer, zyx) -> str:
    """What napari's status bar shows for ``layer`` at data position ``zyx``."""
    step = list(viewer.dims.current_step)
    step[0] = zyx[0]
    viewer.dims.current_step = tuple(step)
    return layer.get_status(tuple(zyx), world=False)["coordinates"]


def _legend(widget) -> dict[int, str]:
    from qtpy.QtCore import Qt

    out = {}
    for i in range(widget.legend.count()):
        item = widget.legend.item(i)
        out[int(item.data(Qt.ItemDataRole.UserRole))] = item.text()
    return out


def _icon_rgb(item) -> tuple[int, int, int]:
    c = item.icon().pixmap(12, 12).toImage().pixelColor(6, 6)
    return (c.red(), c.green(), c.blue())


@pytest.mark.slow
def test_labels_layer_shows_organ_names_colours_and_legend(viewer_widget, qtbot):
    """Hovering a voxel shows its organ's name; one fixed colour per organ in the layer,
    the legend and the ground truth; the legend lists the ids in use and the model's classes."""
    viewer, widget = viewer_widget
    from qtpy.QtCore import Qt

    layer = widget.labels_layer
    gt_layer = viewer.layers["phantom labels (ground truth)"]
    gt = gt_layer.data
    z = 12
    _paint_slice(layer, z, gt[z], only=14)  # the vertebrae
    widget.flush_edits()
    yy, xx = np.nonzero(gt[z] == 14)
    pos = (z, int(yy[0]), int(xx[0]))
    assert "name: vertebrae" in _hover(viewer, layer, pos)
    bg = np.argwhere(layer.data[z] == 0)[0]
    assert "name: background" in _hover(viewer, layer, (z, int(bg[0]), int(bg[1])))
    feats = layer.features
    assert list(feats["name"][list(feats["index"]).index(1)].split()) == ["liver"]

    # colours: by organ name, the same in the working layer, the ground truth and the legend
    def rgb_of(lay, i):
        return tuple(int(round(v * 255)) for v in np.asarray(lay.colormap.map(np.array([i], lay.data.dtype)))[0][:3])

    assert rgb_of(layer, 14) == label_color("vertebrae") == rgb_of(gt_layer, 14)
    assert rgb_of(layer, 1) == label_color("liver") == rgb_of(gt_layer, 1)
    assert np.asarray(layer.colormap.map(np.array([0], layer.data.dtype)))[0][3] == 0, "background transparent"
    assert "name: liver" in _hover(viewer, gt_layer, (z,) + tuple(int(v) for v in np.argwhere(gt[z] == 1)[0]))

    legend = _legend(widget)
    assert set(legend) == set(FLARE_NAMES), "the abdominal model's classes (14 in use among them)"
    assert legend[14].split()[:2] == ["14", "vertebrae"] and "·" not in legend[14]
    assert legend[1].split()[:2] == ["1", "liver"] and "·" in legend[1], "a class not drawn yet is marked"
    items = {int(widget.legend.item(i).data(Qt.ItemDataRole.UserRole)): widget.legend.item(i)
             for i in range(widget.legend.count())}
    assert _icon_rgb(items[14]) == label_color("vertebrae")
    # a label outside the model's classes joins the legend once drawn, with a fallback name
    layer.selected_label = 20
    _paint_slice(layer, 3, np.pad(np.full((4, 4), 20, np.uint8), ((10, 82), (10, 82))))
    qtbot.waitUntil(lambda: 20 in _legend(widget), timeout=5000)
    assert _legend(widget)[20].split()[:2] == ["20", "label_20"]
    assert "name: label_20" in _hover(viewer, layer, (3, 11, 11))
    # clicking a legend entry picks that label to paint with
    item4 = next(widget.legend.item(i) for i in range(widget.legend.count())
                 if widget.legend.item(i).data(Qt.ItemDataRole.UserRole) == 4)
    widget.legend.itemClicked.emit(item4)
    assert layer.selected_label == 4


@pytest.mark.slow
def test_names_of_an_opened_label_file_and_of_the_model(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """A label file's own map (<stem>.labels.json beside it) names its ids; without one,
    the installed reference model's labels.json does."""
    monkeypatch.setenv("PROPSEG_SESSION_HOME", str(tmp_path / "sessions"))
    models = tmp_path / "models" / "reference" / "abdomen"
    models.mkdir(parents=True)
    (models / "net.pt").write_bytes(b"")  # a model folder holds weight files; never loaded here
    (models / "labels.json").write_text(json.dumps({"0": "background", "1": "Brainstem", "2": "SpinalCord"}))
    monkeypatch.setenv("PROPSEG_MODELS", str(tmp_path / "models"))
    from napari_propseg.io import write_labels, write_volume
    from napari_propseg.phantom import make_phantom

    ct, _ = make_phantom(**SMALL)
    case = tmp_path / "case"
    case.mkdir()
    ct_path = write_volume(ct.array, ct, case / "ct.nii.gz")
    seg = np.zeros(ct.shape, np.uint8)
    seg[8, 40:50, 40:50] = 1
    seg[8, 60:70, 40:50] = 2
    seg_path = write_labels(seg, ct, case / "ct_seg.nii.gz")
    (case / "ct_seg.labels.json").write_text(json.dumps({"1": "tumour", "2": "liver"}))

    viewer = make_napari_viewer(show=True)
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-propseg", "PropSeg")
    viewer.open(str(ct_path), plugin="napari-propseg")
    qtbot.wait(50)
    assert widget.model_label_names == {1: "Brainstem", 2: "SpinalCord"}
    assert widget.label_names()[1] == "Brainstem"
    assert set(_legend(widget)) == {1, 2}
    viewer.open(str(seg_path), plugin="napari-propseg")
    seg_layer = viewer.layers["ct_seg"]
    assert "name: tumour" in _hover(viewer, seg_layer, (8, 45, 45)), "the file's own names on the layer opened beside"
    widget.labels_combo.setCurrentText("ct_seg")
    qtbot.wait(50)
    assert widget.labels_layer.name == "ct_seg"
    assert widget.label_names()[1] == "tumour" and widget.label_names()[2] == "liver"
    legend = _legend(widget)
    assert legend[1].split()[:2] == ["1", "tumour"] and legend[2].split()[:2] == ["2", "liver"]
    assert "name: tumour" in _hover(viewer, widget.labels_layer, (8, 45, 45))
    rgb = tuple(int(round(v * 255)) for v in np.asarray(widget.labels_layer.colormap.map(np.array([2], np.uint8)))[0][:3])
    assert rgb == label_color("liver")


def _fake_formats(calls: list):
    mod = types.ModuleType("napari_propseg.formats")

    def export_labels(labels, like, out, fmt, label_map=None):
        calls.append({"fmt": fmt, "out": Path(out), "label_map": dict(label_map or {}), "shape": labels.shape,
                      "like_shape": like.shape})
        Path(out).write_bytes(b"fake " + fmt.encode())
        return Path(out)

    mod.export_labels = export_labels
    return mod


@pytest.mark.slow
def test_export_writes_the_label_map_and_offers_every_format(viewer_widget, qtbot, tmp_path, monkeypatch):
    viewer, widget = viewer_widget
    import napari_propseg
    import napari_propseg.session_store as session_store
    from qtpy.QtWidgets import QFileDialog

    from napari_propseg.io import read_labels
    from napari_propseg.phantom import make_phantom

    gt = viewer.layers["phantom labels (ground truth)"].data
    _paint_slice(widget.labels_layer, 12, gt[12])
    widget.flush_edits()
    ct, _ = make_phantom(**SMALL)

    # without napari_propseg.formats: NIfTI and NRRD, written by io.write_labels
    with monkeypatch.context() as m:
        m.setattr(session_store, "formats_module", lambda: None)
        assert [f[0] for f in widget.export_formats()] == ["nifti", "nrrd"]
        out = widget.export(tmp_path / "case.nii.gz")
        assert out == tmp_path / "case.nii.gz"
        np.testing.assert_array_equal(read_labels(out, ct).array, widget.labels_layer.data)
        label_map = json.loads((tmp_path / "case.labels.json").read_text())
        assert label_map["14"] == "vertebrae" and label_map["1"] == "liver"
        assert set(label_map) == {str(i) for i in FLARE_NAMES}
        assert widget.export(tmp_path / "case.dcm") is None
        assert "formats" in widget.last_error

    # with it: every format in the dialog, the chosen one passed on with the names
    calls: list = []
    fake = _fake_formats(calls)
    monkeypatch.setitem(sys.modules, "napari_propseg.formats", fake)
    monkeypatch.setattr(napari_propseg, "formats", fake, raising=False)
    assert [f[0] for f in widget.export_formats()] == ["nifti", "nrrd", "dicom-seg", "rtstruct", "seg-nrrd"]
    seen = {}

    def dialog(parent, title, start, filters):
        seen["filters"] = filters.split(";;")
        return str(tmp_path / "plan"), "DICOM RTSTRUCT (*.dcm)"

    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(dialog))
    widget.export_btn.click()
    assert seen["filters"] == ["NIfTI (*.nii.gz *.nii)", "NRRD (*.nrrd)", "DICOM SEG (*.dcm)", "DICOM RTSTRUCT (*.dcm)",
                               "3D Slicer segmentation (*.seg.nrrd)"]
    assert calls[-1]["fmt"] == "rtstruct" and calls[-1]["out"] == tmp_path / "plan.dcm"
    assert calls[-1]["label_map"][14] == "vertebrae" and calls[-1]["like_shape"] == SMALL["shape"]
    assert json.loads((tmp_path / "plan.labels.json").read_text())["14"] == "vertebrae"
    # the typed extension decides when it names another format
    monkeypatch.setattr(QFileDialog, "getSaveFileName",
                        staticmethod(lambda *a: (str(tmp_path / "seg.seg.nrrd"), "NIfTI (*.nii.gz *.nii)")))
    widget.export()
    assert calls[-1]["fmt"] == "seg-nrrd" and (tmp_path / "seg.labels.json").exists()
    widget.export(tmp_path / "again.dcm")
    assert calls[-1]["fmt"] == "dicom-seg"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a: ("", "")))
    n = len(calls)
    assert widget.export() is None and len(calls) == n, "a cancelled dialog writes nothing"

