"""The widget's core (napari_propseg.session) without Qt: anchors, undo, locks, geometry,
autosave/resume, paint-event parsing, engine plumbing."""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from napari_propseg.errors import InputError
from napari_propseg.io import Volume, read_labels
from napari_propseg.session import (
    AnchorBook,
    BrokenSessionError,
    Session,
    changed_slices,
    content_key,
    find_session,
    fingerprint,
    geometry_of,
    layer_kwargs,
    keep_aside,
    quarantine_session,
    run_propagation,
    session_dir,
    session_index_dir,
    slices_from_paint_atoms,
    volume_from_geometry,
)


def _vol(shape=(8, 6, 5)):
    return Volume.from_array(np.zeros(shape, np.int16), spacing=(2.5, 0.8, 0.7), origin=(-10.0, 5.0, 30.0),
                             path=None)


def _edited_session(z: int, value: int | None = None):
    """``(geometry, Session)`` of :func:`_vol` with slice ``z`` recorded as edited (filled
    with ``value`` when given)."""
    geom = geometry_of(_vol())
    s = Session(np.zeros(geom["shape"], np.uint8), geom)
    if value is not None:
        s.labels[z] = value
    s.record_edit([z])
    return geom, s


def test_anchor_book_navigation_and_bracket():
    book = AnchorBook(10)
    book.set(2, "suggested")
    book.set(7, "corrected")
    book.set(5, "empty")
    assert book.zs == [2, 5, 7]
    assert book.next_after(5) == 7 and book.prev_before(5) == 2
    assert book.next_after(7) is None and book.prev_before(2) is None
    assert book.bracket(6) == (5, 7)
    assert book.bracket(0) == (0, 2) and book.bracket(9) == (7, 9)
    assert 5 in book and 4 not in book
    assert book.remove(5) and not book.remove(5)
    with pytest.raises(InputError, match="outside the volume"):
        book.set(10, "corrected")
    with pytest.raises(ValueError):
        book.set(1, "great")
    assert AnchorBook.from_list(10, book.to_list()).items() == book.items()


def test_record_edit_sets_status_from_content():
    s = Session(np.zeros((6, 4, 4), np.uint8))
    s.labels[1, 0, 0] = 2
    assert s.record_edit([1, 3, 1]) == [1, 3]
    assert s.anchors.items() == [(1, "corrected"), (3, "empty")]
    assert s.dirty


def test_set_suggested_keeps_corrected_slices():
    s = Session(np.zeros((6, 4, 4), np.uint8))
    s.labels[2] = 5
    s.record_edit([2])
    masks = np.ones((3, 4, 4), np.uint8)
    masks[2] = 0
    done = s.set_suggested([0, 2, 4], masks)
    assert done == [0, 4]
    assert s.anchors.items() == [(0, "suggested"), (2, "corrected"), (4, "empty")]
    assert (s.labels[2] == 5).all(), "a corrected slice is never overwritten by a suggestion"


def test_apply_result_keeps_anchors_and_locked_labels_and_undo_is_one_step():
    s = Session(np.zeros((6, 4, 4), np.uint8))
    s.labels[0, :2] = 1
    s.labels[0, 2:] = 2
    s.labels[5, 3, 3] = 3  # a locked label drawn on a non-anchor slice
    s.record_edit([0])
    s.locked = {3}
    before = s.labels.copy()
    engine_out = np.full_like(s.labels, 2)
    engine_out[0] = 9  # an engine that (wrongly) touches an anchor
    changed = s.apply_result(engine_out, "propagate (test)", confidence=np.linspace(0, 1, 6))
    np.testing.assert_array_equal(s.labels[0], before[0])
    assert s.labels[5, 3, 3] == 3, "locked label kept"
    assert changed == [1, 2, 3, 4, 5]
    assert (s.labels[1:5] == 2).all()
    assert len(s.undo_stack) == 1
    assert s.undo() == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(s.labels, before)
    assert s.undo() == []


def test_apply_result_without_change_pushes_no_undo_step():
    s = Session(np.zeros((4, 3, 3), np.uint8))
    s.record_edit([0])
    assert s.apply_result(s.labels.copy(), "noop") == []
    assert len(s.undo_stack) == 0


def test_undo_stack_is_bounded():
    s = Session(np.zeros((4, 3, 3), np.uint8), max_undo=2)
    s.record_edit([0])
    for v in (1, 2, 3):
        out = s.labels.copy()
        out[1:] = v
        s.apply_result(out, f"p{v}")
    assert len(s.undo_stack) == 2
    s.undo()
    s.undo()
    assert (s.labels[1:] == 1).all()


def test_check_next_prefers_low_confidence_then_distance():
    s = Session(np.zeros((10, 3, 3), np.uint8))
    s.labels[:, 1, 1] = 1
    s.record_edit([0, 9])
    assert s.check_next() in (4, 5)  # farthest labeled slice from the anchors
    s.confidence = np.array([1, .9, .8, .2, .9, .9, .05, .9, .9, 1], np.float32)
    assert s.check_next() == 6
    s.confidence[6] = np.nan
    assert s.check_next() == 3
    full = Session(np.zeros((2, 2, 2), np.uint8))
    full.record_edit([0, 1])
    assert full.check_next() is None


def test_propagation_inputs_require_anchors():
    s = Session(np.zeros((4, 3, 3), np.uint8))
    with pytest.raises(InputError, match="no anchor slices"):
        s.propagation_inputs()


def test_session_rejects_bad_labels():
    with pytest.raises(InputError):
        Session(np.zeros((3, 3), np.uint8))
    with pytest.raises(InputError):
        Session(np.zeros((3, 3, 3), np.float32))


def test_geometry_roundtrip_and_layer_kwargs(tmp_path):
    vol = _vol()
    geom = geometry_of(vol)
    json.dumps(geom)  # JSON-able (goes into napari metadata and session files)
    assert geom["shape"] == [8, 6, 5]
    kw = layer_kwargs(vol, "ct")
    assert kw["scale"] == (2.5, 0.8, 0.7)
    assert kw["translate"] == (30.0, 5.0, -10.0)
    labels = np.zeros(vol.shape, np.uint8)
    labels[3, 2, 1] = 7
    like = volume_from_geometry(kw["metadata"]["propseg_volume"], labels)
    assert like.spacing == vol.spacing and like.origin == vol.origin
    from napari_propseg.io import write_labels

    out = write_labels(labels, like, tmp_path / "l.nii.gz")
    back = read_labels(out, vol)
    np.testing.assert_array_equal(back.array, labels)
    with pytest.raises(InputError, match="shape"):
        volume_from_geometry(geom, labels[:3])


def test_geometry_of_real_file_keeps_orientation(tmp_path, shared_data):
    """A Labels layer drawn on a LAS/RAS file's image is written back in that layout."""
    from napari_propseg.io import read_volume, write_labels

    ct = read_volume(shared_data / "totalseg_example" / "example_ct.nii.gz")
    labels = np.zeros(ct.shape, np.uint8)
    labels[10:12, 20:30, 5:9] = 4
    like = volume_from_geometry(geometry_of(ct), labels)
    out = write_labels(labels, like, tmp_path / "seg.nii.gz")
    import SimpleITK as sitk

    img_ct, img_lab = sitk.ReadImage(str(ct.path)), sitk.ReadImage(str(out))
    assert img_lab.GetSize() == img_ct.GetSize()
    np.testing.assert_allclose(img_lab.GetDirection(), img_ct.GetDirection())
    np.testing.assert_allclose(img_lab.GetOrigin(), img_ct.GetOrigin(), atol=1e-4)
    np.testing.assert_array_equal(read_labels(out, ct).array, labels)


def test_save_load_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("PROPSEG_SESSION_HOME", str(tmp_path / "home"))
    geom = geometry_of(_vol())
    s = Session(np.zeros(geom["shape"], np.uint8), geom, {"method": "interp", "k": 5})
    s.labels[2, 1, 1] = 4
    s.record_edit([2, 6])
    s.locked = {4}
    s.confidence = np.linspace(0, 1, 8).astype(np.float32)
    s.set_suggested([5], np.ones((1, 6, 5), np.uint8), agreement={5: 0.25})
    folder = s.save()
    assert folder.parent == tmp_path / "home" and not s.dirty
    assert find_session(geom) == folder
    # a second save replaces the labels file atomically and keeps one copy
    s.labels[3, 0, 0] = 1
    s.save()
    assert len(list(folder.glob("labels-*.npz"))) == 1
    r = Session.load(folder, geom)
    np.testing.assert_array_equal(r.labels, s.labels)
    assert r.anchors.items() == [(2, "corrected"), (5, "suggested"), (6, "empty")]
    assert r.suggest_agreement == {5: 0.25} and r.next_unverified() == 5
    assert r.locked == {4} and r.settings["method"] == "interp"
    np.testing.assert_allclose(r.confidence, s.confidence)
    # another image: no session found, and loading it explicitly is refused
    other = dict(geom, spacing=[1.0, 1.0, 1.0])
    assert find_session(other) is None
    with pytest.raises(InputError, match="another image"):
        Session.load(folder, other)
    with pytest.raises(InputError, match="no readable PropSeg session"):
        Session.load(tmp_path / "nothing")


def test_session_dir_beside_image_file(tmp_path):
    geom = geometry_of(_vol())
    geom["path"] = str(tmp_path / "case01.nii.gz")
    assert session_dir(geom) == tmp_path / "case01.propseg"
    assert session_dir(geom, tmp_path / "elsewhere") == tmp_path / "elsewhere" / "case01.propseg"
    assert fingerprint(geom) != fingerprint(geometry_of(_vol()))


def test_save_to_unwritable_folder_is_input_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    s = Session(np.zeros((2, 2, 2), np.uint8), geometry_of(_vol((2, 2, 2))))
    with pytest.raises(InputError, match="Cannot save the session"):
        s.save(blocker)


def test_slices_from_paint_atoms():
    tuple_atom = ((np.array([3, 3, 5]), np.array([0, 1, 1]), np.array([2, 2, 2])), np.zeros(3), 1)
    masked = SimpleNamespace(slice_key=(slice(7, 9), slice(0, 4), slice(0, 4)), mask=None, old_values=None, new_value=1)
    assert slices_from_paint_atoms([tuple_atom, masked]) == [3, 5, 7, 8]
    assert slices_from_paint_atoms([]) == []
    assert slices_from_paint_atoms([object()]) == []


def test_changed_slices():
    a = np.zeros((4, 2, 2), np.uint8)
    b = a.copy()
    b[1, 0, 0] = 1
    b[3, 1, 1] = 2
    assert changed_slices(a, b) == [1, 3]


def test_run_propagation_full_and_repropagate_calls():
    calls = []

    class Engine:
        def __init__(self, vol, method, device):
            calls.append(("init", method, device))

        def propagate(self, labels, anchors, *, locked_labels, progress, cancel):
            calls.append(("propagate", tuple(anchors), locked_labels))
            return "full"

        def repropagate(self, labels, anchors, changed, *, locked_labels, progress, cancel):
            calls.append(("re", tuple(changed)))
            return "partial"

    vol = np.zeros((4, 3, 3), np.int16)
    lab = np.zeros((4, 3, 3), np.uint8)
    assert run_propagation(vol, lab, [0], method="interp", device="cpu", locked_labels={2},
                           engine_factory=Engine) == "full"
    assert run_propagation(vol, lab, [0, 2], changed=[2], engine_factory=Engine) == "partial"
    assert calls == [("init", "interp", "cpu"), ("propagate", (0,), (2,)), ("init", "stcn", "auto"), ("re", (2,))]


def test_run_propagation_with_real_engine_interp():
    pytest.importorskip("napari_propseg.propagation.engine")
    from napari_propseg.phantom import make_phantom

    ct, gt = make_phantom((16, 48, 48), (5.0, 6.0, 6.0), 1)
    labels = np.zeros_like(gt.array)
    labels[[4, 11]] = gt.array[[4, 11]]
    res = run_propagation(ct.array, labels, [4, 11], method="interp", device="cpu")
    np.testing.assert_array_equal(res.labels[[4, 11]], gt.array[[4, 11]])
    assert res.labels[7].any()
    assert res.confidence.shape == (16,)


def test_suggest_is_one_undo_step_and_undo_keeps_later_edits():
    s = Session(np.zeros((6, 4, 4), np.uint8))
    s.labels[1] = 4  # a propagated (non-anchor) slice the suggestion will overwrite
    s.labels[3] = 7
    s.record_edit([3])  # the clinician's slice: never overwritten, never reverted
    before = s.labels.copy()
    masks = np.stack([np.full((4, 4), v, np.uint8) for v in (1, 2, 3)])
    assert s.set_suggested([1, 3, 5], masks) == [1, 5]
    assert len(s.undo_stack) == 1
    assert s.anchors.items() == [(1, "suggested"), (3, "corrected"), (5, "suggested")]
    s.labels[5] = 9
    s.record_edit([5])  # corrected after the suggestion: undo must keep it
    assert s.undo() == [1]
    np.testing.assert_array_equal(s.labels[1], before[1])
    assert (s.labels[5] == 9).all() and (s.labels[3] == 7).all()
    assert s.anchors.items() == [(3, "corrected"), (5, "corrected")]


def test_undo_propagation_keeps_slices_painted_since():
    s = Session(np.zeros((5, 3, 3), np.uint8))
    s.labels[0] = 1
    s.record_edit([0])
    s.apply_result(np.ones_like(s.labels), "propagate (test)")
    s.labels[2] = 5
    s.record_edit([2])  # a correction after the propagation
    assert s.undo() == [1, 3, 4]
    assert (s.labels[2] == 5).all() and not s.labels[[1, 3, 4]].any()


def test_check_next_points_at_unverified_suggested_slices_first_and_mark_confirms():
    s = Session(np.zeros((8, 4, 4), np.uint8))
    masks = np.ones((3, 4, 4), np.uint8)
    s.set_suggested([1, 4, 6], masks, agreement={1: 0.9, 4: 0.3, 6: 0.5})
    s.confidence = np.linspace(0, 1, 8)  # slice 0 would be the least confident otherwise
    assert s.next_unverified() == 4 and s.check_next() == 4
    assert s.confirm_anchor(4) == "corrected"  # Mark on a suggested slice confirms it as it is
    assert s.anchors.status(4) == "corrected"
    assert s.check_next() == 6
    s.labels[6] = 2
    s.record_edit([6])  # painted: corrected
    s.confirm_anchor(1)
    assert s.next_unverified() is None and s.check_next() == 0  # then the engine's confidence


def test_mark_confirms_and_never_removes_a_corrected_anchor():
    """Mark anchor pressed again on a slice just corrected keeps it an anchor (it used to
    toggle it off, and the next propagation overwrote the correction)."""
    s = Session(np.zeros((6, 4, 4), np.uint8))
    s.labels[2, 1, 1] = 3
    s.record_edit([2])
    assert s.confirm_anchor(2) == "corrected"
    assert s.confirm_anchor(2) == "corrected" and s.anchors.items() == [(2, "corrected")]
    assert s.confirm_anchor(4) == "empty"  # a slice that holds nothing: confirmed empty
    assert s.remove_anchor(2) == "corrected" and s.anchors.zs == [4]
    assert (s.labels[2, 1, 1] == 3), "removing an anchor keeps its labels"
    assert s.remove_anchor(2) is None
    assert not hasattr(s, "toggle_anchor")


# --------------------------------------------------------------------------- content key, moves, damaged files


def _case_on_disk(folder, seed=0, shape=(8, 12, 10)):
    """A CT written to ``folder/ct.nii.gz`` and read back: (Volume, geometry, key)."""
    from napari_propseg.io import read_volume, write_volume

    rng = np.random.default_rng(seed)
    arr = rng.integers(-1000, 1000, size=shape).astype(np.int16)
    folder.mkdir(parents=True, exist_ok=True)
    path = write_volume(arr, Volume.from_array(arr, spacing=(2.5, 0.8, 0.7), origin=(-10.0, 5.0, 30.0)),
                        folder / "ct.nii.gz")
    vol = read_volume(path)
    geom = geometry_of(vol)
    return vol, geom, content_key(geom, vol.array)


def test_content_key_follows_the_content_not_the_path(tmp_path):
    vol, geom, key = _case_on_disk(tmp_path / "a")
    assert key and key.startswith("image-")
    moved = dict(geom, path=str(tmp_path / "b" / "ct.nii.gz"))
    assert content_key(moved, vol.array) == key
    other = vol.array.copy()
    other[4, 6, 5] += 1
    assert content_key(geom, other) != key, "other voxels, other key"
    assert content_key(dict(geom, spacing=[1.0, 1.0, 1.0]), vol.array) != key
    assert content_key(geom, None) is None and content_key(None, vol.array) is None
    dicom = dict(geom, meta={"series_uid": "1.2.3.4"})
    assert content_key(dicom).startswith("dicom-") and content_key(dicom) == content_key(dicom, other)
    assert content_key(dict(dicom, meta={"series_uid": "1.2.3.5"})) != content_key(dicom)


def test_session_follows_a_moved_case_folder(tmp_path, monkeypatch):
    """Moving the case folder (image + its .propseg folder) keeps the session (it was keyed
    by the absolute path)."""
    import shutil

    from napari_propseg.io import read_volume

    monkeypatch.setenv("PROPSEG_SESSION_HOME", str(tmp_path / "home"))
    vol, geom, key = _case_on_disk(tmp_path / "cases" / "case01")
    s = Session(np.zeros(vol.shape, np.uint8), geom, content_key=key, label_names={1: "liver"})
    s.labels[3, 2, 2] = 1
    s.record_edit([3])
    folder = s.save()
    assert folder == tmp_path / "cases" / "case01" / "ct.propseg"
    shutil.move(str(tmp_path / "cases" / "case01"), str(tmp_path / "archive" / "case01"))
    vol2 = read_volume(tmp_path / "archive" / "case01" / "ct.nii.gz")
    geom2 = geometry_of(vol2)
    key2 = content_key(geom2, vol2.array)
    assert key2 == key and fingerprint(geom2) != fingerprint(geom)
    found = find_session(geom2, content_key=key2)
    assert found == tmp_path / "archive" / "case01" / "ct.propseg"
    r = Session.load(found, geom2, content_key=key2)
    assert r.anchors.items() == [(3, "corrected")] and r.labels[3, 2, 2] == 1
    assert r.label_names == {1: "liver"} and r.content_key == key
    assert find_session(geom2) is None, "without the content key the moved session is not recognised"


def test_session_left_behind_is_found_through_the_index(tmp_path, monkeypatch):
    """Only the image moved: the content-keyed index in the cache folder finds its session."""
    import shutil

    from napari_propseg.io import read_volume

    monkeypatch.setenv("PROPSEG_SESSION_HOME", str(tmp_path / "home"))
    vol, geom, key = _case_on_disk(tmp_path / "in")
    s = Session(np.zeros(vol.shape, np.uint8), geom, content_key=key)
    s.record_edit([5])
    folder = s.save()
    entry = json.loads((session_index_dir() / f"{key}.json").read_text())
    assert entry["folder"] == str(folder.resolve())
    (tmp_path / "out").mkdir()
    shutil.move(str(tmp_path / "in" / "ct.nii.gz"), str(tmp_path / "out" / "ct.nii.gz"))
    vol2 = read_volume(tmp_path / "out" / "ct.nii.gz")
    geom2 = geometry_of(vol2)
    assert find_session(geom2, content_key=content_key(geom2, vol2.array)) == folder
    # another image with the same grid is not given that session
    other = vol2.array.copy()
    other[0, 0, 0] += 7
    assert find_session(geom2, content_key=content_key(geom2, other)) is None
    with pytest.raises(InputError, match="another image"):
        Session.load(folder, geom2, content_key=content_key(geom2, other))
    # the next save goes beside the image again (the primary location), the index follows
    r = Session.load(folder, geom2, content_key=key)
    r.dirty = True
    new_folder = r.save()
    assert new_folder == tmp_path / "out" / "ct.propseg"
    assert find_session(geom2, content_key=key) == new_folder


def test_save_uses_the_atomic_writer_and_cleans_stale_temporaries(tmp_path, monkeypatch):
    import napari_propseg.session_store as session_mod
    from napari_propseg.atomic import TMP_PREFIX

    monkeypatch.setenv("PROPSEG_SESSION_HOME", str(tmp_path / "home"))
    geom, s = _edited_session(1)
    folder = s.save()
    # temporaries of killed saves (the old writer's and the atomic writer's names)
    for name in (".tmp-abc123.npz", ".tmp-xyz.json", TMP_PREFIX + "q1.npz"):
        (folder / name).write_bytes(b"partial")
    assert find_session(geom) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["labels-1.npz", "session.json"]
    (folder / ".tmp-again.npz").write_bytes(b"partial")
    Session.load(folder, geom)
    assert not (folder / ".tmp-again.npz").exists()
    written = []
    real = session_mod.atomic_write

    def spy(path, write, **kw):
        written.append(Path(path).name)
        return real(path, write, **kw)

    monkeypatch.setattr(session_mod, "atomic_write", spy)
    s.dirty = True
    s.save()
    assert written == ["labels-2.npz"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_damaged_session_files_raise_broken_session_and_can_be_kept_aside(tmp_path, monkeypatch):
    monkeypatch.setenv("PROPSEG_SESSION_HOME", str(tmp_path / "home"))
    geom, s = _edited_session(2, 3)
    folder = s.save()
    npz = folder / "labels-1.npz"
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 2])  # truncated by a kill / a full disk
    assert find_session(geom) == folder
    with pytest.raises(BrokenSessionError) as info:
        Session.load(folder, geom)
    assert info.value.file == npz and info.value.folder == folder
    assert isinstance(info.value, InputError)
    moved = quarantine_session(folder, when=0)
    assert sorted(p.name.split(".broken-")[0] for p in moved) == ["labels-1.npz", "session.json"]
    assert all(p.exists() and p.name.endswith(".broken-" + _stamp(0)) for p in moved)
    assert find_session(geom) is None
    # a fresh session saves in the same folder; the broken files stay there
    fresh = Session(np.zeros(geom["shape"], np.uint8), geom)
    fresh.record_edit([0])
    assert fresh.save() == folder and Session.load(folder, geom).anchors.zs == [0]
    assert all(p.exists() for p in moved)
    # a damaged session.json (cut mid-write by an old version) is reported the same way
    (folder / "session.json").write_text('{"format": "propseg-sess')
    assert find_session(geom) == folder
    with pytest.raises(BrokenSessionError, match="damaged"):
        Session.load(folder, geom)


def test_each_series_of_a_dicom_folder_has_its_own_session_folder(tmp_path):
    geom = geometry_of(_vol())
    series = [{"uid": "1.2.3", "n_slices": 80}, {"uid": "1.2.4", "n_slices": 20}]
    geom["path"] = str(tmp_path / "study")
    default = dict(geom, meta={"series_uid": "1.2.3", "series": series})
    other = dict(geom, meta={"series_uid": "1.2.4", "series": series})
    assert session_dir(default) == tmp_path / "study.propseg", "the series read by default keeps the plain name"
    assert session_dir(other).name.startswith("study.series-") and session_dir(other) != session_dir(default)
    assert session_dir(dict(geom, meta={"series_uid": "1.2.4", "series": series[1:]})) == tmp_path / "study.propseg"
    assert content_key(default) != content_key(other)


def test_keep_aside_renames_a_session_for_a_new_one(tmp_path):
    geom, s = _edited_session(1)
    folder = s.save(tmp_path)
    moved = keep_aside(folder, "previous", when=0)
    assert sorted(p.name for p in moved) == [f"labels-1.npz.previous-{_stamp(0)}", f"session.json.previous-{_stamp(0)}"]
    assert keep_aside(folder, "previous") == [] and find_session(geom, tmp_path) is None
    again = keep_aside  # a second session kept aside in the same second gets its own names
    s.dirty = True
    s.save(tmp_path)
    assert all(p.name.endswith("-2") for p in again(folder, "previous", when=0))


def _stamp(t):
    import time

    return time.strftime("%Y%m%d-%H%M%S", time.localtime(t))


# --------------------------------------------------------------------------- runs (the widget's propagate, without Qt)


class _NearestEngine:
    """Each non-anchor slice copies its nearest anchor; repropagate recomputes only the gaps
    next to the changed slices. Records its calls."""

    def __init__(self, vol, method="interp", device="cpu", **kw):
        self.calls = []
        self.kw = kw

    def _fill(self, labels, anchors, zs):
        out = labels.copy()
        a = np.asarray(sorted(anchors))
        for z in zs:
            if z not in anchors:
                out[z] = labels[a[np.argmin(np.abs(a - z))]]
        conf = np.where(np.isin(np.arange(len(labels)), a), 1.0, 0.5).astype(np.float32)
        return SimpleNamespace(labels=out, confidence=conf, computed=list(zs), seconds=0.0, left_empty=[])

    def propagate(self, labels, anchors, *, locked_labels=(), progress=None, cancel=None):
        self.calls.append(("propagate", tuple(anchors)))
        return self._fill(labels, anchors, range(labels.shape[0]))

    def repropagate(self, labels, anchors, changed, *, locked_labels=(), progress=None, cancel=None):
        self.calls.append(("repropagate", tuple(anchors), tuple(changed)))
        book = AnchorBook.from_list(labels.shape[0], [(z, "corrected") for z in anchors])
        zs = sorted({z for c in changed for z in range(book.bracket(c)[0], book.bracket(c)[1] + 1)})
        return self._fill(labels, anchors, zs)

    def suggest_next(self, confidence, anchors):
        return 7


def test_run_bookkeeping_repropagates_only_around_changes_and_writes_back_in_steps(monkeypatch):
    import napari_propseg.session as session_mod

    built = []
    monkeypatch.setattr(session_mod, "make_engine", lambda vol, **kw: built.append(kw) or _NearestEngine(vol, **kw))
    vol = np.zeros((20, 8, 8), np.int16)
    s = Session(np.zeros((20, 8, 8), np.uint8))
    for z, v in ((2, 1), (10, 2), (17, 3)):
        s.labels[z] = v
    s.record_edit([2, 10, 17])
    assert s.pending_changes() is None, "nothing propagated yet: a full propagation"
    run = s.begin_run(method="interp", device="cpu", spacing=(2, 1, 1), volume_id="ct")
    assert run.changed is None and run.description == "propagate (interp)" and run.engine is None
    outcome = run.execute(vol)
    assert built == [{"method": "interp", "device": "cpu", "spacing": (2.0, 1.0, 1.0), "image_weight": None}]
    steps = s.apply_steps(outcome, chunk_voxels=3 * 64)  # three slices per step
    n = 0
    try:
        while True:
            next(steps)
            n += 1
    except StopIteration as stop:
        summary = stop.value
    assert n == 6, "17 changed slices, three per step"
    assert summary.changed == [z for z in range(20) if z not in (2, 10, 17)] and summary.computed == list(range(20))
    assert (s.labels[6] == 1).all() and (s.labels[7] == 2).all() and (s.labels[19] == 3).all()
    assert len(s.undo_stack) == 1 and s.propagated and not s.changed_since
    assert re.fullmatch(r"propagate \(interp\): 17 slices changed in \d+\.\d s\.", summary.text())
    assert s.check_next() == 7, "Check next asks the engine of the last run"

    # one corrected slice: the next run re-propagates only the gaps next to it, with the same engine
    s.labels[13] = 4
    s.record_edit([13])
    run = s.begin_run(method="interp", device="cpu", spacing=(2, 1, 1), volume_id="ct")
    assert run.changed == [13] and run.engine is s.engine and run.description == "re-propagate (interp)"
    outcome = run.execute(vol)
    s.labels[5] = 9  # painted while the engine ran: an anchor, kept, and counted for the next run
    s.record_edit([5])
    summary = s.apply_outcome(outcome)
    assert len(built) == 1, "the engine is reused"
    assert s.engine.calls[-1] == ("repropagate", (2, 10, 13, 17), (13,))
    assert summary.computed == list(range(10, 18)) and set(summary.changed) <= set(range(11, 17))
    assert (s.labels[5] == 9).all() and s.changed_since == {5}
    assert s.pending_changes() == [5]
    # another CT weight: a new engine
    assert s.begin_run(method="interp", device="cpu", spacing=(2, 1, 1), image_weight=0.0, volume_id="ct").engine is None


def test_run_summary_names_slices_left_empty():
    from napari_propseg.session import RunSummary

    text = RunSummary("propagate (interp)", [3, 4], [3, 4], 1.25, 1.0, 0.5, True, [0, 1, 2, 20, 21]).text()
    assert text.startswith("propagate (interp): 2 slices changed in 1.2 s, CT weight 0.5 (auto). Slices 0-2, 20-21 ")


def test_export_writes_the_label_file_and_its_label_map(tmp_path):
    geom = geometry_of(_vol())
    s = Session(np.zeros(geom["shape"], np.uint8), geom, label_names={1: "liver", 2: "spleen"})
    s.labels[3, 2, 2] = 1
    written, json_path, n = s.export(tmp_path / "case.nii.gz")
    assert written == tmp_path / "case.nii.gz" and json_path == tmp_path / "case.labels.json" and n == 1
    names = json.loads(json_path.read_text())
    assert names["1"] == "liver" and names["2"] == "spleen"
    np.testing.assert_array_equal(read_labels(written, volume_from_geometry(geom, s.labels)).array, s.labels)
    with pytest.raises(InputError, match="export format"):
        s.export(tmp_path / "case.png")


def test_save_in_background_writes_and_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("PROPSEG_SESSION_HOME", str(tmp_path / "home"))
    geom, s = _edited_session(2, 1)
    done = []
    s.save_in_background(on_done=lambda folder, exc: done.append((folder, exc))).join(60)
    assert done == [(s.saved_path, None)] and s.saved_path is not None and not s.dirty
    back = Session.load(s.saved_path, geom)
    np.testing.assert_array_equal(back.labels, s.labels)
    assert back.anchors.items() == [(2, "corrected")]
    bare = Session(np.zeros((3, 2, 2), np.uint8))  # no image path and no folder: cannot be saved
    bare.save_in_background(on_done=lambda folder, exc: done.append((folder, exc))).join(60)
    assert done[-1][0] is None and isinstance(done[-1][1], InputError) and bare.dirty


def test_changed_slices_among_compares_only_the_named_slices_and_merge_can_work_in_place():
    a = np.zeros((5, 4, 4), np.uint8)
    b = a.copy()
    b[1, 0, 0] = 2
    b[3, 1, 1] = 1
    assert changed_slices(a, b, among=[3, 4]) == [3]
    assert changed_slices(a, b, among=[4, 3, 3, 1]) == [1, 3]
    from napari_propseg.session_state import merge_result

    result = b.copy()
    merged = merge_result(a, result, anchors=[1], in_place=True)
    assert merged is result and not merged[1].any() and merged[3, 1, 1] == 1
    assert merge_result(a, b, anchors=[1]) is not b and b[1, 0, 0] == 2  # the default leaves the result alone
