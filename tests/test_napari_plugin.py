"""npe2 manifest, discovery, reader, writer and sample data (no window needed)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

npe2 = pytest.importorskip("npe2")

from napari_propseg import _reader, _writer  # noqa: E402
from napari_propseg.io import Volume, read_labels, read_volume, write_labels, write_volume  # noqa: E402
from napari_propseg.preprocess import DISPLAY_PRESETS  # noqa: E402
from napari_propseg.session import META_KEY  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "napari.yaml"


def test_manifest_validates_and_every_contribution_is_a_command():
    pm = npe2.PluginManifest.from_file(MANIFEST)
    assert pm.name == "napari-propseg"
    pm.validate_imports()  # what `npe2 validate` does: every python_name imports
    ids = {c.id for c in pm.contributions.commands}
    assert {c.python_name for c in pm.contributions.commands} >= {
        "napari_propseg._reader:napari_get_reader",
        "napari_propseg._writer:write_labels",
        "napari_propseg._sample_data:make_sample_data",
        "napari_propseg._widget:PropSegWidget",
    }
    used = [r.command for r in pm.contributions.readers] + [w.command for w in pm.contributions.writers]
    used += [s.command for s in pm.contributions.sample_data] + [w.command for w in pm.contributions.widgets]
    assert set(used) <= ids and len(used) == 4


def test_package_manifest_is_the_top_level_file():
    inside = REPO / "napari_propseg" / "napari.yaml"
    assert inside.is_symlink(), "napari_propseg/napari.yaml must stay a symlink to ../napari.yaml"
    assert inside.resolve() == MANIFEST.resolve()


def test_plugin_is_discovered_after_install():
    pm = npe2.PluginManager()
    pm.discover(include_npe1=False)
    manifest = pm.get_manifest("napari-propseg")
    assert manifest.display_name == "PropSeg"
    assert {w.display_name for w in manifest.contributions.widgets} == {"PropSeg"}
    readers = list(pm.iter_compatible_readers([str(REPO / "x.nii.gz")]))
    assert any(r.command == "napari-propseg.get_reader" for r in readers)


@pytest.mark.parametrize("name", ["notes.txt", "image.png", "missing.nii.gz", "empty_dir"])
def test_reader_declines_paths_it_does_not_take(tmp_path, name):
    p = tmp_path / name
    if name == "notes.txt":
        p.write_text("hello")
    elif name == "image.png":
        p.write_bytes(b"\x89PNG\r\n")
    elif name == "empty_dir":
        p.mkdir()
    assert _reader.napari_get_reader(str(p)) is None
    assert _reader.napari_get_reader([str(p)]) is None
    assert _reader.napari_get_reader(None) is None  # never raises


def test_reader_folder_of_non_dicom_files_is_declined(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.dat").write_bytes(b"\0" * 200)
    assert _reader.napari_get_reader(str(tmp_path)) is None


@pytest.fixture
def ct_file(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 1500, size=(6, 20, 16)).astype(np.int16)
    vol = Volume.from_array(arr, spacing=(3.0, 0.9, 0.8), origin=(10.0, -20.0, 55.0))
    return write_volume(arr, vol, tmp_path / "ct.nii.gz"), arr


def test_reader_reads_ct_with_geometry_and_window(ct_file):
    path, arr = ct_file
    fn = _reader.napari_get_reader(str(path))
    assert callable(fn)
    [(data, kwargs, kind)] = fn(str(path))
    assert kind == "image"
    np.testing.assert_array_equal(data, arr)
    np.testing.assert_allclose(kwargs["scale"], (3.0, 0.9, 0.8))
    assert tuple(kwargs["contrast_limits"]) == DISPLAY_PRESETS["abdomen"]
    geom = kwargs["metadata"][META_KEY]
    assert geom["shape"] == list(arr.shape) and geom["path"] == str(path)
    assert kwargs["name"] == "ct"


def test_reader_label_file_opens_as_labels_and_writer_roundtrips(ct_file, tmp_path):
    path, arr = ct_file
    ct = read_volume(path)
    lab = np.zeros(arr.shape, np.uint8)
    lab[2:4, 5:9, 3:7] = 6
    lab_path = write_labels(lab, ct, tmp_path / "seg.nrrd")
    [(data, kwargs, kind)] = _reader.read_layers(str(lab_path))
    assert kind == "labels"
    # the writer puts a Labels layer drawn on the CT back on the CT's grid
    layer_meta = {"name": "seg", "metadata": {META_KEY: _reader.layer_data_for(ct)[1]["metadata"][META_KEY]}}
    out = _writer.write_labels(str(tmp_path / "drawn.nii.gz"), lab, layer_meta)
    assert out == [str(tmp_path / "drawn.nii.gz")]
    np.testing.assert_array_equal(read_labels(out[0], ct).array, lab)


def test_reader_bad_file_notifies_and_adds_nothing(tmp_path, monkeypatch):
    messages = []
    monkeypatch.setattr(_reader, "_notify_error", messages.append)
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(gzip.compress(b"not a nifti header") [:20])
    fn = _reader.napari_get_reader(str(bad))
    assert fn is not None  # the extension is ours; reading fails politely
    assert fn(str(bad)) == [(None,)]
    assert len(messages) == 1 and "broken.nii.gz" in messages[0]
    import SimpleITK as sitk

    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.int16)), str(flat))
    assert fn(str(flat)) == [(None,)]
    assert len(messages) == 2 and "flat.nii.gz" in messages[1]


def test_eight_bit_image_is_not_taken_for_labels(tmp_path):
    grey = np.arange(6 * 20 * 16).reshape(6, 20, 16) % 256
    vol = Volume.from_array(grey.astype(np.uint8))
    path = write_volume(vol.array, vol, tmp_path / "grey.nrrd")
    [(_, _, kind)] = _reader.read_layers(str(path))
    assert kind == "image"
    seg = write_volume((grey % 3).astype(np.uint8), vol, tmp_path / "grey_seg.nrrd")
    assert _reader.read_layers(str(seg))[0][2] == "labels"


def test_writer_without_geometry_writes_nothing(tmp_path, monkeypatch):
    messages = []
    monkeypatch.setattr(_writer, "_notify_error", messages.append)
    monkeypatch.setattr(_writer, "_geometry_from_viewer", lambda shape: None)
    target = tmp_path / "x.nii.gz"
    assert _writer.write_labels(str(target), np.zeros((3, 4, 4), np.uint8), {"name": "l", "metadata": {}}) == []
    assert not target.exists() and "carries no image geometry" in messages[0]


def test_reader_dicom_folder(shared_data):
    folder = shared_data / "totalseg_example" / "example_ct_dicom"
    fn = _reader.napari_get_reader(str(folder))
    assert fn is not None
    [(data, kwargs, kind)] = fn(str(folder))
    assert kind == "image" and data.ndim == 3 and data.shape[0] == 20
    np.testing.assert_allclose(kwargs["scale"], kwargs["metadata"][META_KEY]["spacing"])


def test_npe2_reads_through_the_plugin(ct_file):
    path, arr = ct_file
    npe2.PluginManager.instance().discover(include_npe1=False)
    layer_data = npe2.read([str(path)], stack=False, plugin_name="napari-propseg")
    assert layer_data[0][2] == "image"
    np.testing.assert_array_equal(layer_data[0][0], arr)


def test_sample_data_small():
    from napari_propseg._sample_data import make_sample_data

    (ct, ck, ckind), (lab, lk, lkind) = make_sample_data((12, 48, 48), (5.0, 6.0, 6.0), 2)
    assert (ckind, lkind) == ("image", "labels")
    assert ct.shape == lab.shape == (12, 48, 48)
    assert ck["scale"] == lk["scale"] == (5.0, 6.0, 6.0)
    assert ck["metadata"][META_KEY]["shape"] == [12, 48, 48]
    assert 1 in np.unique(lab) and lk["metadata"]["propseg_label_names"][1] == "liver"
    assert ct.std() > 50  # a CT, not a blank array
