"""GUI tests in a real napari window (Xvfb under scripts/test.sh): the phantom sample
with the PropSeg widget docked, and the clinician's loop driven through the widget.

The loop tests use a small copy-nearest engine (below) so that they check the widget's
own behaviour (anchors, re-propagation range, cancel, undo, export, resume) quickly and
independently of the network; one test runs the real engine (method interp) when it is
installed.
"""
from __future__ import annotations

import functools
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_propseg.progress import check_cancel, report  # noqa: E402

pytestmark = pytest.mark.gui

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(shape=(24, 96, 96), spacing=(5.0, 3.2, 3.2), seed=3)


def _has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or os.environ.get(
        "QT_QPA_PLATFORM", ""
    ) in ("offscreen", "minimal")


@pytest.fixture(autouse=True)
def _display_or_skip():
    if not _has_display():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("no display for the GUI tests; run them through scripts/test.sh (xvfb-run)")
        pytest.skip("no display; run through scripts/test.sh (xvfb-run)")


@pytest.fixture(autouse=True)
def _napari_settings_in_memory(monkeypatch):
    """napari settings that are never written to the user's settings file (the widget sets
    a reader preference when it loads)."""
    from napari import settings
    from napari.settings import NapariSettings

    monkeypatch.setattr(settings, "_SETTINGS", NapariSettings(config_path=None))


class CopyNearestEngine:
    """Test engine: each slice takes the labels of its nearest anchor (ties: lower).

    ``repropagate`` recomputes only the slices between the anchors around the changed
    slices, like the real engine. ``delay`` seconds per slice make cancel testable.
    """

    calls: list = []

    def __init__(self, volume_hu, method="interp", device="auto", delay=0.0):
        self.volume = volume_hu
        self.delay = delay
        CopyNearestEngine.calls.append(("init", method, device))

    def _fill(self, labels, anchors, zs, progress, cancel):
        out = labels.copy()
        a = np.asarray(sorted(anchors))
        for i, z in enumerate(zs):
            check_cancel(cancel)
            if self.delay:
                time.sleep(self.delay)
            if z not in anchors:
                out[z] = labels[a[np.argmin(np.abs(a - z))]]
            report(progress, i + 1, len(zs), f"slice {z}")
        conf = np.where(np.isin(np.arange(len(labels)), a), 1.0, 0.5)
        conf[len(labels) // 3] = 0.1  # a slice "worth checking"
        return SimpleNamespace(labels=out, confidence=conf, computed=list(zs), seconds=0.0)

    def propagate(self, labels, anchors, *, locked_labels=(), progress=None, cancel=None):
        CopyNearestEngine.calls.append(("propagate", tuple(anchors)))
        return self._fill(labels, anchors, list(range(labels.shape[0])), progress, cancel)

    def repropagate(self, labels, anchors, changed, *, locked_labels=(), progress=None, cancel=None):
        CopyNearestEngine.calls.append(("repropagate", tuple(anchors), tuple(changed)))
        a = sorted(anchors)
        zs = set()
        for c in changed:
            lo = max([x for x in a if x < c], default=0)
            hi = min([x for x in a if x > c], default=labels.shape[0] - 1)
            zs.update(range(lo, hi + 1))
        return self._fill(labels, anchors, sorted(zs), progress, cancel)


@pytest.fixture
def viewer_widget(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    """A shown viewer with the phantom sample (small) and the PropSeg widget docked."""
    monkeypatch.setenv("PROPSEG_SESSION_HOME", str(tmp_path / "sessions"))
    import napari_propseg._sample_data as sd

    monkeypatch.setattr(sd, "SAMPLE_SHAPE", SMALL["shape"])
    monkeypatch.setattr(sd, "SAMPLE_SPACING", SMALL["spacing"])
    monkeypatch.setattr(sd, "SAMPLE_SEED", SMALL["seed"])
    monkeypatch.setattr(sd.make_sample_data, "__defaults__", (SMALL["shape"], SMALL["spacing"], SMALL["seed"]))
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-propseg", "phantom")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-propseg", "PropSeg")
    qtbot.wait(50)
    return viewer, widget


def _wait_idle(qtbot, widget, timeout=30000):
    qtbot.waitUntil(lambda: not widget.is_busy(), timeout=timeout)


def _paint_slice(layer, z, labels2d, only=None):
    """Paint slice ``z`` through the Labels layer API (emits napari's paint event, like
    a brush stroke): the non-zero voxels of ``labels2d`` (only label ``only`` if given)."""
    mask = labels2d == only if only is not None else labels2d > 0
    yy, xx = np.nonzero(mask)
    assert yy.size, f"nothing to paint on slice {z}"
    layer.data_setitem((np.full(yy.shape, z), yy, xx), labels2d[yy, xx])


@pytest.mark.slow
def test_sample_opens_with_widget_and_canvas_is_not_blank(viewer_widget, qtbot):
    viewer, widget = viewer_widget
    from napari.layers import Image, Labels

    from napari_propseg._widget import PropSegWidget
    from napari_propseg.preprocess import DISPLAY_PRESETS
    from napari_propseg.session import META_KEY

    assert isinstance(widget, PropSegWidget)
    ct = viewer.layers["phantom CT"]
    gt = viewer.layers["phantom labels (ground truth)"]
    assert isinstance(ct, Image) and isinstance(gt, Labels)
    np.testing.assert_allclose(ct.scale, SMALL["spacing"])
    assert tuple(ct.metadata[META_KEY]["shape"]) == SMALL["shape"]
    assert tuple(ct.contrast_limits) == DISPLAY_PRESETS["abdomen"]
    # the widget bound the CT and a new Labels layer on its grid
    assert widget.image_layer is ct
    assert widget.labels_layer.data.shape == ct.data.shape and not widget.labels_layer.data.any()
    np.testing.assert_allclose(widget.labels_layer.scale, ct.scale)

    viewer.dims.current_step = (SMALL["shape"][0] // 2, 0, 0)
    widget.preset_combo.setCurrentText("bone")
    assert tuple(ct.contrast_limits) == DISPLAY_PRESETS["bone"]
    widget.preset_combo.setCurrentText("abdomen")
    qtbot.wait(200)

    canvas = viewer.screenshot(canvas_only=True, flash=False)
    full = viewer.screenshot(canvas_only=False, flash=False)
    assert canvas.ndim == 3 and canvas.shape[2] == 4
    rgb = canvas[..., :3].astype(float)
    background = np.median(np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]), axis=0)
    not_bg = np.abs(rgb - background).sum(axis=-1) > 30
    assert rgb.std() > 20, f"canvas looks blank (pixel std {rgb.std():.1f})"
    assert not_bg.mean() > 0.05, f"only {not_bg.mean():.1%} of the canvas differs from the background"
    # the full window is larger than the canvas: it holds the docked widget
    assert full.shape[1] > canvas.shape[1]
    assert full[..., :3].std() > 20
    if os.environ.get("PROPSEG_SAVE_SCREENSHOT") == "1":
        from skimage.io import imsave

        out = REPO / "docs" / "screenshot.png"
        out.parent.mkdir(exist_ok=True)
        imsave(out, full, check_contrast=False)


@pytest.mark.slow
def test_clinician_loop(viewer_widget, qtbot, tmp_path, monkeypatch):
    """Paint -> propagate -> correct -> re-propagate -> cancel -> undo -> export -> resume."""
    viewer, widget = viewer_widget
    import napari_propseg.session as session_mod
    from napari_propseg.io import read_labels
    from napari_propseg.phantom import make_phantom

    CopyNearestEngine.calls.clear()
    engine_kw = []

    def factory(vol, method, device, **kw):
        engine_kw.append(kw)
        return CopyNearestEngine(vol, method, device)

    monkeypatch.setattr(session_mod, "make_engine", factory)
    gt = viewer.layers["phantom labels (ground truth)"].data
    layer = widget.labels_layer
    s = widget.session
    z_lo, z_hi = 6, 18
    for z in (z_lo, z_hi):
        _paint_slice(layer, z, gt[z])
    qtbot.waitUntil(lambda: len(s.anchors) == 2, timeout=5000)
    assert s.anchors.items() == [(z_lo, "corrected"), (z_hi, "corrected")]
    assert widget.anchor_list.count() == 2
    anchors_before = layer.data[[z_lo, z_hi]].copy()

    widget.propagate_btn.click()
    assert widget.is_busy() or s.undo_stack  # started in a worker (or already done)
    _wait_idle(qtbot, widget)
    assert widget.last_error is None
    np.testing.assert_array_equal(layer.data[[z_lo, z_hi]], anchors_before)
    filled = [z for z in range(layer.data.shape[0]) if layer.data[z].any()]
    assert filled == list(range(layer.data.shape[0])), "every slice gets labels"
    np.testing.assert_array_equal(layer.data[10], anchors_before[0])
    assert s.confidence is not None and len(s.undo_stack) == 1
    assert engine_kw == [{"spacing": SMALL["spacing"], "image_weight": None}], "the engine gets the CT's voxel size and the CT weight (auto)"

    # check next -> the engine's least confident non-anchor slice
    widget.check_btn.click()
    assert widget.current_z() == SMALL["shape"][0] // 3

    # correct slice 12: only the range between its neighbouring anchors is recomputed
    before = layer.data.copy()
    _paint_slice(layer, 12, gt[12], only=13)
    qtbot.waitUntil(lambda: s.anchors.status(12) == "corrected", timeout=5000)
    widget.propagate()
    _wait_idle(qtbot, widget)
    assert CopyNearestEngine.calls[-1][0] == "repropagate" and CopyNearestEngine.calls[-1][2] == (12,)
    changed = [z for z in range(before.shape[0]) if not np.array_equal(before[z], layer.data[z])]
    assert changed and min(changed) > z_lo and max(changed) < z_hi
    assert 12 in changed
    np.testing.assert_array_equal(layer.data[:z_lo + 1], before[:z_lo + 1])

    # cancel midway: labels unchanged
    monkeypatch.setattr(session_mod, "make_engine", lambda vol, method, device, **kw: CopyNearestEngine(vol, method, device, delay=0.3))
    widget.method_combo.setCurrentText("stcn")
    widget.method_combo.setCurrentText("interp")
    _paint_slice(layer, 3, gt[3])
    widget.flush_edits()
    snapshot = layer.data.copy()
    n_undo = len(s.undo_stack)
    widget.propagate()
    qtbot.waitUntil(lambda: widget._progress is not None and widget._progress[0] >= 1, timeout=10000)
    widget.cancel_btn.click()
    _wait_idle(qtbot, widget)
    assert widget.status.text() == "Propagation cancelled; the labels are unchanged."
    np.testing.assert_array_equal(layer.data, snapshot)
    assert len(s.undo_stack) == n_undo

    # undo the re-propagation as one step
    after_repropagation = layer.data.copy()
    widget.undo_btn.click()
    for z in changed:
        expected = after_repropagation[z] if z == 12 else before[z]  # the painted anchor stays
        np.testing.assert_array_equal(layer.data[z], expected)
    assert s.anchors.zs == [3, z_lo, 12, z_hi]

    # export onto the original grid, with a label map beside it
    out = widget.export(tmp_path / "export" / "case.nii.gz")
    assert out is None  # folder missing -> notification, nothing written
    (tmp_path / "export").mkdir()
    out = widget.export(tmp_path / "export" / "case.nii.gz")
    assert out is not None and out.exists()
    assert (tmp_path / "export" / "case.labels.json").exists()
    ct, _ = make_phantom(**SMALL)
    back = read_labels(out, ct)
    np.testing.assert_array_equal(back.array, layer.data)
    assert back.spacing == ct.spacing and back.origin == ct.origin

    # autosave happened after each propagation; a fresh binding offers to resume, with the
    # settings of the saved session (method and CT weight) even when the widget's differ
    widget.image_weight_spin.setValue(0.7)
    widget._autosave(force=True)
    saved = np.array(layer.data)
    anchors = s.anchors.items()
    widget.session = None  # a fresh start (napari reopened): nothing of this session left to save
    layer.data[...] = 0
    widget.method_combo.setCurrentText("stcn")
    widget.image_weight_spin.setValue(widget.image_weight_spin.minimum())
    widget._attach(widget.image_layer, layer)
    assert widget.resume_btn.isVisibleTo(widget)
    widget.resume_btn.click()
    np.testing.assert_array_equal(layer.data, saved)
    assert widget.session.anchors.items() == anchors
    assert widget.method_combo.currentText() == "interp" and widget.image_weight() == pytest.approx(0.7)


@pytest.mark.slow
def test_anchor_navigation_and_mark(viewer_widget, qtbot):
    viewer, widget = viewer_widget
    widget.goto(5)
    widget.mark_btn.click()
    widget.goto(15)
    widget.mark_btn.click()
    assert widget.session.anchors.items() == [(5, "empty"), (15, "empty")]
    widget.goto(10)
    widget.goto_anchor(+1)
    assert widget.current_z() == 15
    widget.goto_anchor(-1)
    assert widget.current_z() == 5
    item = widget.anchor_list.item(1)
    widget.anchor_list.itemClicked.emit(item)
    assert widget.current_z() == 15
    assert len(viewer.layers["PropSeg anchors"].data) == 2
    widget.mark_anchor()  # Mark again: the anchor stays (it used to toggle off)
    assert widget.session.anchors.zs == [5, 15]
    assert widget.remove_anchor() is True  # an empty anchor goes without a question
    assert widget.session.anchors.zs == [5]
    assert len(viewer.layers["PropSeg anchors"].data) == 1


@pytest.mark.slow
def test_no_anchor_propagate_notifies(viewer_widget, qtbot):
    _viewer, widget = viewer_widget
    widget.propagate()
    assert not widget.is_busy()
    assert widget.last_error and "anchor" in widget.last_error


@pytest.mark.slow
def test_real_engine_interp(viewer_widget, qtbot):
    """The widget drives the real propagation engine (SDF interpolation, no weights)."""
    pytest.importorskip("napari_propseg.propagation.engine")
    viewer, widget = viewer_widget
    gt = viewer.layers["phantom labels (ground truth)"].data
    layer = widget.labels_layer
    for z in (6, 18):
        _paint_slice(layer, z, gt[z])
    widget.flush_edits()
    widget.method_combo.setCurrentText("interp")
    widget.device_combo.setCurrentText("cpu")
    widget.propagate()
    _wait_idle(qtbot, widget, timeout=120000)
    assert widget.last_error is None, widget.last_error
    text = widget.status_text()
    assert "slices changed in" in text and "CT weight 0.5." in text, text  # two anchors: the fallback weight
    left = widget.last_result.left_empty
    assert widget.last_summary.left_empty == left
    assert ("left empty" in text) == bool(left), "the slices left empty beyond the outermost anchors are named"
    assert layer.data[12].any(), "a slice between the anchors is filled"
    np.testing.assert_array_equal(layer.data[6], gt[6])
    np.testing.assert_array_equal(layer.data[18], gt[18])
    inside = [z for z in range(7, 18) if gt[z].any()]
    dice = 2 * ((layer.data[inside] > 0) & (gt[inside] > 0)).sum() / ((layer.data[inside] > 0).sum() + (gt[inside] > 0).sum())
    assert dice > 0.5, f"interpolated foreground Dice {dice:.2f} between the anchors"
    # the widget shows exactly what the engine computes for these anchors
    from napari_propseg.session import run_propagation

    seeds = np.zeros_like(gt)
    seeds[[6, 18]] = gt[[6, 18]]
    direct = run_propagation(viewer.layers["phantom CT"].data, seeds, [6, 18], method="interp", device="cpu",
                             spacing=SMALL["spacing"])
    np.testing.assert_array_equal(layer.data, direct.labels)
    assert widget.session.confidence is not None and widget.session.confidence.shape == (gt.shape[0],)
    # check next uses the engine's suggest_next: a non-anchor slice
    widget.check_next()
    assert widget.current_z() not in (6, 18)
    # a screenshot of the widget in use: labels, anchors, confidence plot
    viewer.layers["phantom labels (ground truth)"].visible = False
    viewer.dims.current_step = (12, 0, 0)
    qtbot.wait(200)
    full = viewer.screenshot(canvas_only=False, flash=False)
    assert full[..., :3].std() > 20
    if os.environ.get("PROPSEG_SAVE_SCREENSHOT") == "1":
        from skimage.io import imsave

        imsave(REPO / "docs" / "screenshot_workflow.png", full, check_contrast=False)
    # CT weight 0: shapes only, i.e. plain SDF interpolation; the weight is saved with the session
    from napari_propseg.propagation.interp import sdf_interpolate

    assert widget.image_weight() is None and widget.session.settings.get("image_weight", "auto") == "auto"
    widget.image_weight_spin.setValue(0.0)
    assert widget.session.settings["image_weight"] == 0.0 and widget.image_weight() == 0.0
    widget.propagate()
    _wait_idle(qtbot, widget, timeout=120000)
    assert widget.last_error is None, widget.last_error
    assert re.search(r"CT weight 0\.( |$)", widget.status_text()), widget.status_text()
    np.testing.assert_array_equal(layer.data, sdf_interpolate(seeds, [6, 18]))
    widget.image_weight_spin.setValue(widget.image_weight_spin.minimum())
    assert widget.image_weight_spin.text() == "auto" and widget.image_weight() is None


@pytest.mark.slow
def test_suggest_without_weights_notifies(viewer_widget, qtbot, tmp_path, monkeypatch):
    _viewer, widget = viewer_widget
    if not widget.suggest_btn.isEnabled():
        pytest.skip("reference module not installed")
    monkeypatch.setenv("PROPSEG_MODELS", str(tmp_path / "no-models"))
    widget.suggest_btn.click()
    _wait_idle(qtbot, widget)
    assert widget.last_error and "weights" in widget.last_error
    assert len(widget.session.anchors) == 0 and not widget.labels_layer.data.any()


def _write_tiny_reference_pair(folder: Path) -> list[Path]:
    """Two test-sized reference networks (random weights, fixed seed) as weight files."""
    import torch

    from napari_propseg.reference import build_reference_model, save_reference_model

    folder.mkdir(parents=True)
    torch.manual_seed(1)
    paths = []
    for preset in ("transunet-tiny", "deeplabv3plus-tiny"):
        model = build_reference_model({"preset": preset, "num_classes": 15})
        paths.append(save_reference_model(folder / f"{preset}.pt", model))
    return paths


@pytest.mark.slow
def test_suggest_end_to_end(viewer_widget, qtbot, tmp_path, monkeypatch):
    """Suggest with the default weights folder -> suggested anchors exactly as the
    reference module computes them, on those slices only -> correct one -> propagate."""
    pytest.importorskip("napari_propseg.reference.inference")
    pytest.importorskip("napari_propseg.propagation.engine")
    viewer, widget = viewer_widget
    import napari_propseg.reference.inference as inference

    # two random test networks disagree everywhere: keep every organ they predict (the
    # default drops organs whose two masks overlap little)
    suggest_slices = functools.partial(inference.suggest_slices, min_agreement=0.0)
    monkeypatch.setattr(inference, "suggest_slices", suggest_slices)
    _write_tiny_reference_pair(tmp_path / "models" / "reference")
    monkeypatch.setenv("PROPSEG_MODELS", str(tmp_path / "models"))
    assert widget.suggest_btn.isEnabled()
    widget.device_combo.setCurrentText("cpu")
    widget.k_spin.setValue(4)
    layer, s = widget.labels_layer, widget.session
    widget.suggest_btn.click()
    _wait_idle(qtbot, widget, timeout=120000)
    assert widget.last_error is None, widget.last_error

    ct = viewer.layers["phantom CT"].data
    direct = suggest_slices(ct, k=4, device="cpu")  # the same default weights
    zs = list(direct.slices)
    assert len(zs) >= 4
    assert all(direct.labels[z].any() for z in zs), "the test networks predict something on every slice"
    assert s.anchors.items() == [(z, "suggested") for z in zs]
    assert [widget.anchor_list.item(i).text().split() for i in range(widget.anchor_list.count())] == [
        ["slice", str(z), "suggested"] for z in zs]
    assert len(viewer.layers["PropSeg anchors"].data) == len(zs)
    np.testing.assert_array_equal(layer.data[zs], direct.labels[zs])
    others = [z for z in range(ct.shape[0]) if z not in zs]
    assert not layer.data[others].any(), "labels written on the suggested slices only"
    assert len(s.undo_stack) == 1 and s.undo_stack.peek().description == "suggest"

    # the clinician corrects one suggested slice: it becomes "corrected", the rest stay "suggested"
    gt = viewer.layers["phantom labels (ground truth)"].data
    z_fix = zs[1]
    organ = int(np.bincount(gt[z_fix][gt[z_fix] > 0]).argmax())
    _paint_slice(layer, z_fix, gt[z_fix], only=organ)
    qtbot.waitUntil(lambda: s.anchors.status(z_fix) == "corrected", timeout=5000)
    assert s.anchors.items() == [(z, "corrected" if z == z_fix else "suggested") for z in zs]
    assert "corrected" in widget.anchor_list.item(1).text()
    anchors = s.anchors.items()
    on_anchors = layer.data[zs].copy()
    assert not np.array_equal(on_anchors[1], direct.labels[z_fix])

    widget.method_combo.setCurrentText("interp")
    widget.propagate_btn.click()
    _wait_idle(qtbot, widget, timeout=120000)
    assert widget.last_error is None, widget.last_error
    assert s.anchors.items() == anchors
    np.testing.assert_array_equal(layer.data[zs], on_anchors)
    between = [z for z in range(zs[0] + 1, zs[-1]) if z not in zs]
    assert all(layer.data[z].any() for z in between), "slices between anchors are filled"
    assert len(s.undo_stack) == 2

    # Undo twice: the propagation, then the suggestion; the corrected slice stays
    widget.undo_btn.click()
    assert not layer.data[between].any()
    widget.undo_btn.click()
    assert s.anchors.items() == [(z_fix, "corrected")]
    np.testing.assert_array_equal(layer.data[z_fix], on_anchors[1])
    assert not layer.data[[z for z in range(ct.shape[0]) if z != z_fix]].any()
    assert "suggestion" in widget.status.text()


@pytest.mark.slow
def test_suggest_cancel_leaves_labels_and_anchors(viewer_widget, qtbot, monkeypatch):
    pytest.importorskip("napari_propseg.reference.inference")
    _viewer, widget = viewer_widget
    import napari_propseg.reference.inference as inference

    def slow_suggest(volume, k, device, progress, cancel, model=None):
        for i in range(k):
            check_cancel(cancel)
            time.sleep(0.2)
            report(progress, i + 1, k, f"slice {i}")
        raise AssertionError("the Cancel button did not stop the suggestion")

    monkeypatch.setattr(inference, "suggest_slices", slow_suggest)
    widget.k_spin.setValue(50)
    widget.suggest_btn.click()
    qtbot.waitUntil(lambda: widget._progress is not None and widget._progress[0] >= 1, timeout=10000)
    widget.cancel_btn.click()
    _wait_idle(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    assert widget.status.text() == "Suggest cancelled; the labels are unchanged."
    assert len(widget.session.anchors) == 0 and widget.anchor_list.count() == 0
    assert not widget.labels_layer.data.any()
    assert widget.suggest_btn.isEnabled() and widget.propagate_btn.isEnabled() and not widget.cancel_btn.isEnabled()


def _key_click(qtbot, target, key: str) -> None:
    """Press and release a napari-style key combination ("Shift-R") on a Qt widget."""
    from qtpy.QtGui import QKeySequence

    combo = QKeySequence(key.replace("-", "+"))[0]
    qtbot.keyClick(target, combo.key(), combo.keyboardModifiers())


@pytest.mark.slow
def test_shortcuts_are_free_in_napari(viewer_widget):
    """No shortcut shadows napari's own bindings (viewer, any layer type, menus), so each
    does the same whichever layer is active, and napari keeps all of its keys."""
    from app_model.types import KeyBinding
    from napari import layers
    from napari._app_model import get_app_model
    from napari.components.viewer_model import ViewerModel
    from napari.utils.key_bindings import coerce_keybinding

    from napari_propseg._widget import SHORTCUT_HELP, SHORTCUTS

    ours = {coerce_keybinding(k): name for name, k in SHORTCUTS.items()}
    assert len(ours) == len(SHORTCUTS), "two actions share a key"
    taken = {}
    for cls in [ViewerModel] + [c for c in vars(layers).values() if isinstance(c, type) and issubclass(c, layers.Layer)]:
        taken.update({coerce_keybinding(k): f"{cls.__name__} keymap" for k in cls.class_keymap if k is not Ellipsis})
    for kb in get_app_model().keybindings:
        taken[KeyBinding.validate(kb.keybinding)] = kb.command_id
    clashes = {ours[k]: taken[k] for k in ours if k in taken}
    assert not clashes, f"shortcuts taken by napari: {clashes}"
    for key in SHORTCUTS.values():
        assert key in SHORTCUT_HELP


@pytest.mark.slow
@pytest.mark.parametrize("focus", ["canvas", "dock"])
def test_keyboard_shortcuts(viewer_widget, qtbot, monkeypatch, focus):
    """Real key presses reach every action, with the focus in the canvas (napari's
    keymap) or in the PropSeg dock (e.g. right after a button click)."""
    viewer, widget = viewer_widget
    import napari_propseg._widget as w
    import napari_propseg.session as session_mod

    CopyNearestEngine.calls.clear()
    monkeypatch.setattr(session_mod, "make_engine", lambda vol, method, device, **kw: CopyNearestEngine(vol, method, device))
    # a button has the focus after a click; it takes plain arrow keys for focus moves
    target = viewer.window._qt_viewer.canvas.native if focus == "canvas" else widget.mark_btn
    window = viewer.window._qt_window
    window.activateWindow()
    qtbot.waitUntil(window.isActiveWindow, timeout=5000)  # key presses reach the active window
    target.setFocus()
    press = functools.partial(_key_click, qtbot, target)
    keys = w.SHORTCUTS
    s, layer = widget.session, widget.labels_layer
    gt = viewer.layers["phantom labels (ground truth)"].data

    # mark anchor makes the current slice an anchor; pressed again it stays one
    widget.goto(5)
    press(keys["mark_anchor"])
    assert s.anchors.items() == [(5, "empty")]
    press(keys["mark_anchor"])
    assert s.anchors.items() == [(5, "empty")]
    _paint_slice(layer, 5, gt[5])
    widget.goto(17)
    press(keys["mark_anchor"])
    qtbot.waitUntil(lambda: s.anchors.zs == [5, 17], timeout=5000)

    # next / previous anchor move the slider from anchor to anchor
    widget.goto(10)
    press(keys["next_anchor"])
    assert widget.current_z() == 17
    press(keys["next_anchor"])
    assert widget.current_z() == 17, "no anchor after the last one: stay"
    press(keys["prev_anchor"])
    assert widget.current_z() == 5
    widget.goto(11)
    press(keys["prev_anchor"])
    assert widget.current_z() == 5

    # propagate starts a propagation in the worker
    press(keys["propagate"])
    assert widget.is_busy() or s.undo_stack
    _wait_idle(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    assert CopyNearestEngine.calls[-1] == ("propagate", (5, 17))
    assert len(s.undo_stack) == 1 and s.confidence is not None

    # check next jumps to the least confident non-anchor slice
    widget.goto(0)
    press(keys["check_next"])
    assert widget.current_z() == SMALL["shape"][0] // 3 == int(np.argmin(np.where(
        np.isin(np.arange(len(s.confidence)), s.anchors.zs), np.inf, s.confidence)))


def test_shortcuts_unbound_when_the_widget_is_gone(make_napari_viewer, qtbot):
    from napari.utils.key_bindings import coerce_keybinding

    from napari_propseg._widget import SHORTCUTS, PropSegWidget

    viewer = make_napari_viewer()
    widget = PropSegWidget(viewer)
    keys = [coerce_keybinding(k) for k in SHORTCUTS.values()]
    assert all(k in viewer.keymap for k in keys)
    with qtbot.waitSignal(widget.destroyed, timeout=5000):
        widget.deleteLater()
    assert not any(k in viewer.keymap for k in keys)


@pytest.mark.slow
def test_locked_label_survives_propagation(viewer_widget, qtbot, monkeypatch):
    viewer, widget = viewer_widget
    import napari_propseg.session as session_mod

    class Overwriter(CopyNearestEngine):
        def propagate(self, labels, anchors, *, locked_labels=(), progress=None, cancel=None):
            out = np.full_like(labels, 2)  # an engine that ignores locks entirely
            return SimpleNamespace(labels=out, confidence=np.ones(len(labels)), computed=[], seconds=0.0)

    monkeypatch.setattr(session_mod, "make_engine", lambda vol, method, device, **kw: Overwriter(vol, method, device))
    layer = widget.labels_layer
    layer.data[10, 5:9, 5:9] = 7  # drawn earlier, not an anchor
    _paint_slice(layer, 4, np.pad(np.ones((4, 4), np.uint8), ((40, 52), (40, 52))))
    widget.flush_edits()
    layer.selected_label = 7
    widget.lock_btn.click()
    assert widget.session.locked == {7} and "7" in widget.lock_btn.text()
    widget.propagate()
    _wait_idle(qtbot, widget)
    assert (layer.data[10, 5:9, 5:9] == 7).all()
    assert (layer.data[4, 40:44, 40:44] == 1).all() and (layer.data[4] != 2).all(), "anchor kept"
    assert (layer.data[12] == 2).all()


@pytest.mark.slow
def test_napari_save_uses_our_writer_for_a_plain_labels_layer(viewer_widget, tmp_path):
    """A Labels layer made with napari's own button (no geometry in its metadata) is
    still written on the CT's grid: the writer finds the image of the same shape."""
    viewer, _widget = viewer_widget
    from napari_propseg.io import read_labels
    from napari_propseg.phantom import make_phantom

    data = np.zeros(SMALL["shape"], np.uint8)
    data[5, 10:20, 30:40] = 4
    plain = viewer.add_labels(data, name="plain")
    viewer.layers.selection.active = plain
    out = tmp_path / "plain.nrrd"
    written = viewer.layers.save(str(out), selected=True, plugin="napari-propseg")
    assert written == [str(out)]
    ct, _ = make_phantom(**SMALL)
    back = read_labels(out, ct)
    np.testing.assert_array_equal(back.array, data)
    assert back.spacing == ct.spacing


@pytest.mark.slow
def test_model_picker_lists_installed_models_and_suggest_uses_it(viewer_widget, qtbot, monkeypatch):
    """The Model picker offers the installed reference models; Suggest runs the chosen one
    and the status line names it."""
    pytest.importorskip("napari_propseg.reference.inference")
    viewer, widget = viewer_widget
    import napari_propseg.reference.inference as inference

    items = [widget.model_combo.itemText(i) for i in range(widget.model_combo.count())]
    assert items[0] == "abdomen" and "head_neck" in items
    # one default k for the widget and the CLI: auto = min(Z // 5, 64)
    assert widget.k_spin.value() == 0 and widget.k_spin.specialValueText() == "auto"
    seen = {}
    real = inference.suggest_slices

    def spy(volume, *a, **kw):
        seen.update(kw)
        return real(volume, *a, **{**kw, "k": 2})

    monkeypatch.setattr(inference, "suggest_slices", spy)
    widget.device_combo.setCurrentText("cpu")
    widget.model_combo.setCurrentText("head_neck")
    widget.suggest_btn.click()
    _wait_idle(qtbot, widget, timeout=120000)
    assert widget.last_error is None, widget.last_error
    assert seen["model"] == "head_neck" and seen["k"] is None
    assert "head_neck" in widget.status_text()


@pytest.mark.slow
def test_gui_benchmark_reports_both_phases_from_the_real_widget(qapp, tmp_path, monkeypatch):
    """``propseg bench gui`` on a small phantom: both phases run through the widget, end idle
    and report the event-loop blocks, the slices changed and the status line."""
    from napari_propseg._widget.bench import run_gui_benchmark

    monkeypatch.setenv("PROPSEG_SESSION_HOME", str(tmp_path))
    res = run_gui_benchmark(shape=(24, 96, 96), n_anchors=4, method="interp", timeout=120)
    assert res["anchors"] == sorted(res["anchors"]) and len(res["anchors"]) == 4
    for name in ("propagate", "repropagate"):
        phase = res[name]
        assert phase["seconds"] > 0 and phase["engine_seconds"] > 0 and 0 <= phase["max_block_s"] < 5
        assert phase["slices_changed"] >= 1 and phase["ticks"] > 1
        assert "slices changed in" in phase["status"]
    lo, hi = res["gap"]
    assert set(res["repropagate"]["recomputed"]) <= set(range(lo + 1, hi))  # only the gaps next to the correction
