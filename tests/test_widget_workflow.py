"""Issue #15 "Nothing lost, nothing confusing", in a real napari window: Mark anchor
confirms and Remove anchor removes (asking first), Resume (once, with a fresh status
line, a damaged session kept aside), the dock at napari's default window size with its
own progress bar, anchors marked where the eye is, the DICOM series choice and PropSeg
as napari's reader for CT files."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from test_widget_gui import (  # noqa: E402,F401 - fixtures and helpers shared with the GUI tests
    SMALL,
    CopyNearestEngine,
    _display_or_skip,
    _napari_settings_in_memory,
    _paint_slice,
    _wait_idle,
    viewer_widget,
)

pytestmark = pytest.mark.gui

RESUME_NOTICE = "A saved PropSeg session of this image exists"


@pytest.fixture
def notices(monkeypatch):
    """Every notification the widget shows: [(kind, message)]."""
    import napari_propseg._widget.common as common

    seen: list[tuple[str, str]] = []
    real = common.notify

    def spy(kind, message):
        seen.append((kind, message))
        real(kind, message)

    monkeypatch.setattr(common, "notify", spy)
    return seen


def _use_copy_engine(monkeypatch, delay=0.0):
    import napari_propseg.session as session_mod

    CopyNearestEngine.calls.clear()
    monkeypatch.setattr(session_mod, "make_engine", lambda vol, method, device, **kw: CopyNearestEngine(vol, method, device, delay=delay))


def _small_sample(monkeypatch):
    import napari_propseg._sample_data as sd

    monkeypatch.setattr(sd.make_sample_data, "__defaults__", (SMALL["shape"], SMALL["spacing"], SMALL["seed"]))


# --------------------------------------------------------------------------- Mark / Remove anchor


@pytest.mark.slow
def test_mark_confirms_and_remove_asks_before_dropping_a_correction(viewer_widget, qtbot, monkeypatch, notices):
    viewer, widget = viewer_widget
    _use_copy_engine(monkeypatch)
    gt = viewer.layers["phantom labels (ground truth)"].data
    layer, s = widget.labels_layer, widget.session
    for z in (6, 18):
        _paint_slice(layer, z, gt[z])
    widget.flush_edits()
    widget.propagate_btn.click()
    _wait_idle(qtbot, widget)
    # the status line tells what the run did (slices changed and seconds), and it stays
    assert re.fullmatch(r"propagate \(interp\): \d+ slices changed in \d+\.\d s\.", widget.status.text()), widget.status.text()

    # correct slice 12, then press Mark anchor there (a clinician confirming the slice)
    _paint_slice(layer, 12, gt[12], only=13)
    qtbot.waitUntil(lambda: s.anchors.status(12) == "corrected", timeout=5000)
    corrected = layer.data[12].copy()
    widget.goto(12)
    widget.mark_btn.click()
    assert s.anchors.status(12) == "corrected", "Mark anchor on a corrected slice keeps it (it used to remove it)"
    widget.propagate_btn.click()
    _wait_idle(qtbot, widget)
    assert CopyNearestEngine.calls[-1][:2] == ("repropagate", (6, 12, 18))
    np.testing.assert_array_equal(layer.data[12], corrected)
    assert re.fullmatch(r"re-propagate \(interp\): \d+ slices changed in \d+\.\d s\.", widget.status.text())

    # Mark on a suggested slice confirms it as it is
    s.set_suggested([3], layer.data[3:4].copy())
    widget.goto(3)
    widget.mark_anchor()
    assert s.anchors.status(3) == "corrected" and "confirmed" in widget.status.text()

    # Remove anchor on a correction asks first; "No" keeps it
    questions = []
    monkeypatch.setattr(type(widget), "_ask", lambda self, title, text: questions.append(text) or False)
    widget.goto(12)
    assert widget.remove_btn.isEnabled()
    widget.remove_btn.click()
    assert len(questions) == 1 and "Slice 12 holds your correction" in questions[0]
    assert s.anchors.status(12) == "corrected"
    monkeypatch.setattr(type(widget), "_ask", lambda self, title, text: questions.append(text) or True)
    widget.remove_btn.click()
    assert s.anchors.zs == [3, 6, 18] and len(questions) == 2
    np.testing.assert_array_equal(layer.data[12], corrected), "removing keeps the labels until the next propagation"
    widget.propagate()
    _wait_idle(qtbot, widget)
    assert CopyNearestEngine.calls[-1] == ("repropagate", (3, 6, 18), (3, 12)), "the ranges around them are recomputed"
    np.testing.assert_array_equal(layer.data[12], layer.data[6] if 12 - 6 <= 18 - 12 else layer.data[18])
    # a suggested (or empty) anchor goes without a question; a non-anchor: nothing happens
    s.set_suggested([22], layer.data[22:23].copy())
    widget.goto(22)
    assert widget.remove_anchor() is True and len(questions) == 2 and 22 not in s.anchors
    widget.goto(4)
    assert widget.remove_anchor() is False and "not an anchor" in widget.status.text()
    assert not [m for k, m in notices if k == "error"]


@pytest.mark.slow
def test_session_survives_layers_added_when_the_widget_was_docked_first(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    """napari hands the widget a proxied viewer; the layers it adds (labels, the anchor
    overlay) used to look like other layers and re-bound a fresh session, losing the anchors."""
    monkeypatch.setenv("PROPSEG_SESSION_HOME", str(tmp_path / "sessions"))
    from napari_propseg.io import write_volume
    from napari_propseg.phantom import make_phantom

    ct, _ = make_phantom(**SMALL)
    path = write_volume(ct.array, ct, tmp_path / "ct.nii.gz")
    viewer = make_napari_viewer(show=True)
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-propseg", "PropSeg")
    viewer.open(str(path), plugin="napari-propseg")
    qtbot.wait(50)
    session = widget.session
    widget.goto(5)
    widget.mark_anchor()  # adds the anchor overlay layer
    viewer.add_points(np.zeros((0, 3)), name="unrelated")
    assert widget.session is session and session.anchors.zs == [5]
    assert widget.labels_layer in list(viewer.layers)


# --------------------------------------------------------------------------- re-propagation is local


@pytest.mark.slow
@pytest.mark.parametrize("weight", ["auto", 0.5])
def test_repropagation_after_one_corrected_slice_recomputes_only_its_gaps(viewer_widget, qtbot, weight):
    """Issue #18: after one corrected slice the widget's re-propagation (real engine,
    interp) recomputes only the gaps next to it, and the status line says how many slices
    changed and how long it took."""
    pytest.importorskip("napari_propseg.propagation.engine")
    viewer, widget = viewer_widget
    gt = viewer.layers["phantom labels (ground truth)"].data
    layer = widget.labels_layer
    filled = [z for z in range(gt.shape[0]) if gt[z].any()]
    anchors = [filled[round(i * (len(filled) - 1) / 4)] for i in range(5)]
    for z in anchors:
        _paint_slice(layer, z, gt[z])
    widget.flush_edits()
    widget.method_combo.setCurrentText("interp")
    widget.device_combo.setCurrentText("cpu")
    if weight != "auto":
        widget.image_weight_spin.setValue(weight)
    widget.propagate()
    _wait_idle(qtbot, widget, timeout=120000)
    assert widget.last_error is None, widget.last_error
    assert widget.last_summary.description == "propagate (interp)"
    assert re.match(r"propagate \(interp\): \d+ slices changed in \d+\.\d s", widget.status_text())

    lo, hi = anchors[1], anchors[2]
    z = (lo + hi) // 2
    assert z not in anchors and gt[z].any()
    before = np.array(layer.data)
    _paint_slice(layer, z, gt[z])
    qtbot.waitUntil(lambda: widget.session.anchors.status(z) == "corrected", timeout=5000)
    widget.propagate()
    _wait_idle(qtbot, widget, timeout=120000)
    assert widget.last_error is None, widget.last_error
    summary = widget.last_summary
    assert summary.description == "re-propagate (interp)"
    assert summary.computed, "the engine says which slices it recomputed"
    assert set(summary.computed) <= set(range(lo, hi + 1)), (summary.computed, lo, hi)
    assert set(summary.changed) <= set(range(lo + 1, hi)), summary.changed
    outside = [k for k in range(gt.shape[0]) if not lo <= k <= hi]
    np.testing.assert_array_equal(layer.data[outside], before[outside])
    assert re.match(rf"re-propagate \(interp\): {len(summary.changed)} slices changed in \d+\.\d s",
                    widget.status_text()), widget.status_text()


# --------------------------------------------------------------------------- Resume


def _saved_phantom_session(make_napari_viewer, qtbot, tmp_path):
    """A first viewer labels the phantom and autosaves; returns (anchors, labels)."""
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-propseg", "phantom")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-propseg", "PropSeg")
    gt = viewer.layers["phantom labels (ground truth)"].data
    _paint_slice(widget.labels_layer, 8, gt[8])
    widget.goto(15)
    widget.mark_anchor()
    widget._autosave(force=True)
    folder = widget.session.saved_path
    assert folder is not None and (folder / "session.json").exists()
    return widget.session.anchors.items(), np.array(widget.labels_layer.data), folder


@pytest.mark.slow
def test_resume_is_offered_once_and_updates_the_status(make_napari_viewer, qtbot, tmp_path, monkeypatch, notices):
    monkeypatch.setenv("PROPSEG_SESSION_HOME", str(tmp_path / "sessions"))
    _small_sample(monkeypatch)
    anchors, labels, folder = _saved_phantom_session(make_napari_viewer, qtbot, tmp_path)
    notices.clear()
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-propseg", "phantom")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-propseg", "PropSeg")
    qtbot.wait(50)
    offers = [m for _k, m in notices if m.startswith(RESUME_NOTICE)]
    assert len(offers) == 1, f"the session notice showed {len(offers)} times"
    assert widget.resume_btn.isVisibleTo(widget) and RESUME_NOTICE in widget.status.text()
    widget.resume_btn.click()
    assert widget.session.anchors.items() == anchors
    np.testing.assert_array_equal(widget.labels_layer.data, labels)
    assert widget.status.text().startswith(f"Resumed the session saved in {folder}: 2 anchors"), widget.status.text()
    assert not widget.resume_btn.isVisibleTo(widget)
    assert not [m for k, m in notices if k == "error"]

    # an offer ignored: the first autosave keeps the earlier session aside, never over it
    widget.session = None  # napari reopened
    widget._attach(widget.image_layer, widget.labels_layer)
    assert widget.resume_btn.isVisibleTo(widget)
    widget.goto(3)
    widget.mark_anchor()
    widget._autosave(force=True)
    kept = sorted(p.name for p in folder.iterdir() if ".previous-" in p.name)
    assert [k.split(".previous-")[0] for k in kept] == ["labels-1.npz", "session.json"], kept
    assert not widget.resume_btn.isVisibleTo(widget)
    assert any("kept as" in m for _k, m in notices)
    from napari_propseg.session import Session

    assert Session.load(folder).anchors.zs == [3], "the new session is saved; the earlier one is kept aside"


@pytest.mark.slow
def test_resume_of_a_damaged_session_starts_fresh_and_keeps_the_files(make_napari_viewer, qtbot, tmp_path, monkeypatch,
                                                                     notices):
    monkeypatch.setenv("PROPSEG_SESSION_HOME", str(tmp_path / "sessions"))
    _small_sample(monkeypatch)
    _anchors, _labels, folder = _saved_phantom_session(make_napari_viewer, qtbot, tmp_path)
    [npz] = list(folder.glob("labels-*.npz"))
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 3])  # killed mid-write by an older version / a full disk
    (folder / ".tmp-killed.npz").write_bytes(b"partial")
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-propseg", "phantom")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-propseg", "PropSeg")
    assert not (folder / ".tmp-killed.npz").exists(), "stale temporaries are cleaned when the session is found"
    questions = []

    # "No": nothing is touched, the clinician is told; saving later keeps the damaged files aside
    monkeypatch.setattr(type(widget), "_ask", lambda self, title, text: questions.append(text) or False)
    widget.resume_btn.click()
    assert len(questions) == 1 and "damaged" in questions[0] and npz.exists()
    assert widget.last_error and "damaged" in widget.last_error
    widget.goto(4)
    widget.mark_anchor()
    widget._autosave(force=True)
    assert sorted(p.name.split(".broken-")[0] for p in folder.iterdir() if ".broken-" in p.name) == [
        npz.name, "session.json"]
    for p in folder.glob("*.broken-*"):
        p.unlink()
    [npz] = list(folder.glob("labels-*.npz"))  # the new session's: damaged as well now
    npz.write_bytes(npz.read_bytes()[:100])
    widget._offer_resume(widget.session.geometry)
    assert widget.resume_btn.isVisibleTo(widget)

    # "Yes": the damaged files are kept aside, a fresh session goes on
    notices.clear()
    monkeypatch.setattr(type(widget), "_ask", lambda self, title, text: questions.append(text) or True)
    widget.resume_btn.click()
    assert len(questions) == 2
    broken = sorted(p.name for p in folder.iterdir() if ".broken-" in p.name)
    assert [b.split(".broken-")[0] for b in broken] == [npz.name, "session.json"]
    assert not npz.exists() and not (folder / "session.json").exists()
    warnings = [m for k, m in notices if k == "warning"]
    assert len(warnings) == 1 and "damaged" in warnings[0] and "started a new session" in warnings[0]
    assert not widget.resume_btn.isVisibleTo(widget)
    assert widget.session is not None and widget.session.anchors.zs == [4], "the session in the widget goes on"
    gt = viewer.layers["phantom labels (ground truth)"].data
    _paint_slice(widget.labels_layer, 10, gt[10])
    widget._autosave(force=True)
    assert (folder / "session.json").exists(), "the new session saves in the same folder"


# --------------------------------------------------------------------------- the dock


@pytest.mark.slow
def test_dock_fits_the_default_window_and_shows_its_own_progress(viewer_widget, qtbot, monkeypatch):
    viewer, widget = viewer_widget
    from qtpy.QtWidgets import QPushButton, QScrollArea

    import napari_propseg._widget as w

    window = viewer.window._qt_window
    window.resize(1089, 644)  # napari's default window size
    scroll = widget.findChild(QScrollArea)
    assert scroll is not None and scroll.widget().isAncestorOf(widget.export_btn), "the dock's content scrolls"
    long = "Cannot read /very/long/path/" + "x" * 400 + " because of reasons; choose another file."
    widget._set_status(long)
    qtbot.wait(100)
    assert widget.minimumSizeHint().height() < 300, "the dock asks for little height; its content scrolls"
    assert widget.height() <= window.height()
    assert len(widget.status.text()) <= w.STATUS_MAX_CHARS and widget.status.text().endswith("…")
    assert widget.status_text() == long and widget.status.toolTip() == long
    for b in widget.findChildren(QPushButton):
        if not b.isVisibleTo(widget):
            continue
        scroll.ensureWidgetVisible(b)
        qtbot.wait(10)
        assert not b.visibleRegion().isEmpty(), f"button {b.text()!r} cannot be reached"

    # the progress of a job shows in the dock's own bar (redrawn at most every PROGRESS_EVERY_S)
    _use_copy_engine(monkeypatch, delay=0.2)
    gt = viewer.layers["phantom labels (ground truth)"].data
    _paint_slice(widget.labels_layer, 6, gt[6])
    widget.flush_edits()
    assert not widget.progress_bar.isVisible()
    widget.propagate()
    qtbot.waitUntil(lambda: widget.progress_bar.isVisible() and widget.progress_bar.value() >= 2, timeout=10000)
    assert widget.progress_bar.maximum() == SMALL["shape"][0]
    assert 2 <= widget.progress_bar.value() <= widget._progress[0]
    widget.cancel()
    _wait_idle(qtbot, widget)
    assert not widget.progress_bar.isVisible()


@pytest.mark.slow
def test_anchors_are_marked_on_the_canvas_and_the_slice_strip(viewer_widget, qtbot):
    viewer, widget = viewer_widget
    from napari.layers import Shapes
    from qtpy.QtCore import QPoint, Qt

    import napari_propseg._widget as w

    gt = viewer.layers["phantom labels (ground truth)"].data
    widget.goto(5)
    widget.mark_anchor()  # empty
    _paint_slice(widget.labels_layer, 10, gt[10])
    widget.flush_edits()  # corrected
    overlay = viewer.layers[w.ANCHOR_LAYER]
    assert isinstance(overlay, Shapes) and len(overlay.data) == 2
    assert sorted(int(d[0, 0]) for d in overlay.data) == [5, 10]
    ny, nx = SMALL["shape"][1:]
    frame = overlay.data[1]
    assert frame[:, 1].min() < 0.5 and frame[:, 1].max() > ny - 1.5 and frame[:, 2].max() > nx - 1.5, "around the image"
    assert list(overlay.features["status"]) == ["anchor: empty", "anchor: corrected"]
    assert viewer.layers.selection.active is widget.labels_layer, "painting goes on after the overlay is added"

    # visible on the anchor slice, absent on the next one
    for name in ("phantom labels (ground truth)", widget.labels_layer.name):
        viewer.layers[name].visible = False
    green = np.array(w.ANCHOR_COLORS["corrected"], float)

    def green_pixels(z):
        widget.goto(z)
        qtbot.wait(100)
        rgb = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float)
        return int((np.abs(rgb - green).sum(axis=-1) < 60).sum())

    on, off = green_pixels(10), green_pixels(11)
    assert on > 200 and off < on / 10, (on, off)

    # the slice strip: anchors as ticks; a click goes to the slice under the mouse
    strip = widget.plot
    assert strip.anchors == [(5, "empty"), (10, "corrected")]
    qtbot.mouseClick(strip, Qt.MouseButton.LeftButton, pos=QPoint(int(strip.x_of(17)), strip.height() // 2))
    assert widget.current_z() == 17 and strip.current == 17


# --------------------------------------------------------------------------- DICOM series


def _write_dicom_series(folder: Path, arr: np.ndarray, uid: str, desc: str, spacing=(2.0, 0.8, 0.8)):
    """(Z, Y, X) int16 HU as a DICOM CT series (one file per slice)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    sz, sy, sx = spacing
    for z in range(arr.shape[0]):
        sl = sitk.GetImageFromArray(arr[z].astype(np.int16))
        sl.SetSpacing((sx, sy))
        tags = {
            "0008|0060": "CT", "0008|103e": desc, "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": uid,
            "0020|0013": str(z + 1), "0020|0032": f"-10.000000\\-10.000000\\{z * sz:.6f}",
            "0020|0037": "1\\0\\0\\0\\1\\0", "0028|1052": "0", "0028|1053": "1", "0008|0018": f"{uid}.{z + 1}",
        }
        for k, v in tags.items():
            sl.SetMetaData(k, v)
        writer.SetFileName(str(folder / f"s{uid.split('.')[-1]}_{z:03d}.dcm"))
        writer.Execute(sl)


@pytest.mark.slow
def test_a_dicom_folder_with_several_series_offers_the_others(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("PROPSEG_SESSION_HOME", str(tmp_path / "sessions"))
    from napari_propseg.session import META_KEY

    rng = np.random.default_rng(0)
    folder = tmp_path / "study"
    uid_a, uid_b = "1.2.826.0.1.3680043.2.1125.7", "1.2.826.0.1.3680043.2.1125.8"
    _write_dicom_series(folder, rng.integers(-500, 500, (6, 24, 20)), uid_a, "soft tissue")
    _write_dicom_series(folder, rng.integers(-500, 500, (4, 24, 20)), uid_b, "bone")
    viewer = make_napari_viewer(show=True)
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-propseg", "PropSeg")
    assert not widget.series_combo.isVisibleTo(widget)
    viewer.open(str(folder), plugin="napari-propseg")
    qtbot.wait(50)
    first_image, first_labels = widget.image_layer, widget.labels_layer
    assert first_image.data.shape == (6, 24, 20)
    combo = widget.series_combo
    assert combo.isVisibleTo(widget) and widget.series_label.isVisibleTo(widget)
    assert [combo.itemText(i) for i in range(combo.count())] == ["soft tissue · 6 slices", "bone · 4 slices"]
    assert combo.currentIndex() == 0 and combo.itemData(1) == uid_b
    widget.goto(2)
    widget.mark_anchor()

    combo.setCurrentIndex(1)
    combo.activated.emit(1)  # the user picks the other series
    qtbot.waitUntil(lambda: not widget.is_busy() and widget.image_layer is not first_image, timeout=20000)
    assert widget.last_error is None, widget.last_error
    image = widget.image_layer
    assert image.data.shape == (4, 24, 20) and image.metadata[META_KEY]["meta"]["series_uid"] == uid_b
    assert widget.labels_layer.data.shape == (4, 24, 20) and widget.labels_layer is not first_labels
    assert not first_image.visible and not first_labels.visible, "the other series is hidden, not deleted"
    assert first_image in list(viewer.layers)
    assert combo.currentIndex() == 1 and "bone" in widget.status.text()
    first = folder.parent / "study.propseg"
    assert (first / "session.json").exists(), "the first series' anchors were saved when switching"
    # each series keeps its own session; going back offers the first one's
    widget.goto(1)
    widget.mark_anchor()
    widget._autosave(force=True)
    assert widget.session.saved_path != first and widget.session.saved_path.name.startswith("study.series-")
    first_image.visible = True
    widget.image_combo.setCurrentText(first_image.name)
    qtbot.wait(50)
    assert widget.image_layer is first_image and widget.labels_layer is first_labels, "its own labels layer again"
    assert widget.resume_btn.isVisibleTo(widget)
    widget.resume()
    assert widget.session.anchors.zs == [2]


# --------------------------------------------------------------------------- reader preference


@pytest.mark.slow
def test_propseg_becomes_the_reader_for_ct_files_unless_the_user_chose(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("PROPSEG_SESSION_HOME", str(tmp_path / "sessions"))
    from napari.settings import get_settings

    from napari_propseg.io import write_volume
    from napari_propseg.phantom import make_phantom
    from napari_propseg.session import META_KEY

    settings = get_settings()
    settings.plugins.extension2reader = {"*.nrrd": "napari", "*.mha": "some-plugin"}  # the user's own choices
    viewer = make_napari_viewer(show=True)
    ct, _ = make_phantom(**SMALL)
    path = write_volume(ct.array, ct, tmp_path / "ct.nii.gz")
    from napari.errors import MultipleReaderError

    # plugin=None: what File > Open does (viewer.open's default is napari's builtins)
    with pytest.raises(MultipleReaderError):
        viewer.open(str(path), plugin=None)  # napari's builtins claim *.nii.gz too: napari asks
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-propseg", "PropSeg")
    prefs = get_settings().plugins.extension2reader
    assert prefs["*.nii.gz"] == prefs["*.nii"] == prefs["*.mhd"] == prefs["*.dcm"] == "napari-propseg"
    assert prefs["*.nrrd"] == "napari" and prefs["*.mha"] == "some-plugin", "the user's choices stay"
    [layer] = viewer.open(str(path), plugin=None)  # no question any more, and PropSeg's reader read it
    assert META_KEY in layer.metadata
    np.testing.assert_allclose(layer.scale, SMALL["spacing"], rtol=1e-6)
    from napari_propseg._widget import ensure_reader_preference

    assert ensure_reader_preference() == [], "set once; nothing to do the next time"
