"""The synthetic abdominal CT phantom: determinism, geometry, intensities, anatomy along z,
and the ``propseg sample`` command."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from napari_propseg.errors import CancelledError, InputError
from napari_propseg.phantom import PHANTOM_LABELS, make_phantom

# Same anatomy as the default (96, 256, 256) at (2.5, 1.2, 1.2) mm, a quarter of the voxels.
SMALL = (48, 128, 128)
SMALL_SPACING = (5.0, 2.4, 2.4)
ORGANS = {n: i for i, n in PHANTOM_LABELS.items()}


@pytest.fixture(scope="module")
def default_phantom():
    return make_phantom()


@pytest.fixture(scope="module")
def small_phantoms():
    return {seed: make_phantom(SMALL, SMALL_SPACING, seed) for seed in (0, 1, 2)}


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.array(ndimage.center_of_mass(mask))


def _z_range(mask: np.ndarray) -> tuple[int, int]:
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    return int(zs[0]), int(zs[-1])


# ----------------------------------------------------------------------------- basics
def test_shapes_dtypes_geometry(default_phantom):
    ct, lab = default_phantom
    assert ct.array.shape == lab.array.shape == (96, 256, 256)
    assert ct.array.dtype == np.int16 and lab.array.dtype == np.uint8
    assert ct.spacing == lab.spacing == (2.5, 1.2, 1.2)
    np.testing.assert_allclose(ct.direction, np.eye(3))
    assert ct.origin == lab.origin
    # centred on x = y = 0: origin is minus half the extent (LPS x, y, z order)
    np.testing.assert_allclose(ct.origin[:2], (-127.5 * 1.2, -127.5 * 1.2))
    assert ct.meta["phantom_seed"] == 0
    assert ct.meta["label_names"] == PHANTOM_LABELS


def test_every_label_present_and_nothing_else(default_phantom):
    _, lab = default_phantom
    assert set(np.unique(lab.array).tolist()) == {0, *PHANTOM_LABELS}
    assert PHANTOM_LABELS == {1: "liver", 2: "kidney_right", 3: "spleen", 4: "pancreas", 5: "aorta",
                              6: "inferior_vena_cava", 9: "gallbladder", 11: "stomach",
                              13: "kidney_left", 14: "vertebrae"}


def test_deterministic_per_seed(small_phantoms):
    ct0, lab0 = small_phantoms[0]
    ct0b, lab0b = make_phantom(SMALL, SMALL_SPACING, 0)
    np.testing.assert_array_equal(ct0.array, ct0b.array)
    np.testing.assert_array_equal(lab0.array, lab0b.array)
    ct1, lab1 = small_phantoms[1]
    assert not np.array_equal(lab0.array, lab1.array)
    assert np.mean(ct0.array != ct1.array) > 0.3  # different noise and anatomy


def test_seeds_move_and_resize_organs(small_phantoms):
    """Different seeds are different patients: organ volumes and z-extents differ."""
    vols = {s: {i: int((lab.array == i).sum()) for i in PHANTOM_LABELS} for s, (_, lab) in small_phantoms.items()}
    for organ in ("liver", "spleen", "kidney_left"):
        i = ORGANS[organ]
        v = [vols[s][i] for s in vols]
        assert max(v) / min(v) > 1.03, (organ, v)
    extents = {s: _z_range(lab.array == ORGANS["kidney_right"]) for s, (_, lab) in small_phantoms.items()}
    assert len(set(extents.values())) > 1, extents


def test_bad_arguments_raise_input_error():
    with pytest.raises(InputError, match="too small"):
        make_phantom((4, 16, 16))
    with pytest.raises(InputError, match="three"):
        make_phantom((10, 64))
    with pytest.raises(InputError, match="spacing"):
        make_phantom((16, 64, 64), (1.0, 0.0, 1.0))


def test_progress_and_cancel():
    calls = []
    make_phantom((16, 48, 48), (15.0, 6.4, 6.4), progress=lambda s, n, m: calls.append((s, n)))
    assert calls[-1] == (18, 18) and len(calls) == 18
    assert [s for s, _ in calls] == sorted(s for s, _ in calls)
    seen = []

    def cancel():
        seen.append(1)
        return len(seen) > 3

    with pytest.raises(CancelledError):
        make_phantom((16, 48, 48), (15.0, 6.4, 6.4), cancel=cancel)


# ----------------------------------------------------------------------------- intensities
@pytest.mark.parametrize(
    "organ, lo, hi",
    [("liver", 45, 80), ("spleen", 35, 70), ("pancreas", 25, 60), ("kidney_right", 100, 180),
     ("kidney_left", 100, 180), ("aorta", 170, 240), ("inferior_vena_cava", 95, 150),
     ("gallbladder", -10, 30), ("vertebrae", 150, 900)],
)
def test_organ_hu_plausible(default_phantom, organ, lo, hi):
    ct, lab = default_phantom
    core = ndimage.binary_erosion(lab.array == ORGANS[organ], iterations=1)
    assert core.sum() > 20
    med = float(np.median(ct.array[core]))
    assert lo <= med <= hi, (organ, med)


def test_tissues_air_fat_gas_lung_bone(default_phantom):
    ct, lab = default_phantom
    a = ct.array
    corner = a[:, :12, :12]
    assert abs(float(np.median(corner)) + 1000) < 10
    # image noise in homogeneous parenchyma: quantum noise + texture, 10..30 HU
    liver_core = ndimage.binary_erosion(lab.array == ORGANS["liver"], iterations=3)
    assert 10 < float(a[liver_core].std()) < 30
    # subcutaneous fat: a sizeable share of body voxels sit near -100 HU
    body = a > -500
    fat = (a > -160) & (a < -40)
    assert fat[body].mean() > 0.08
    # stomach holds gas and fluid
    st = a[lab.array == ORGANS["stomach"]]
    assert (st < -500).mean() > 0.03 and ((st > -20) & (st < 60)).mean() > 0.2
    # lungs (< -700 HU inside the body) fill the top slices; low down only bowel gas
    body_ = np.stack([ndimage.binary_fill_holes(s > -500) for s in a])
    dark = ((a < -700) & body_).sum(axis=(1, 2)) / body_.sum(axis=(1, 2))
    assert dark[-2:].mean() > 0.1 and dark[: a.shape[0] // 2].mean() < 0.06
    # cortical bone reaches > 600 HU
    assert a[lab.array == ORGANS["vertebrae"]].max() > 600


# ----------------------------------------------------------------------------- anatomy
def test_left_right_anterior_posterior(default_phantom):
    """Canonical LPS: x toward patient left (liver at low x), y toward posterior."""
    _, lab = default_phantom
    L = lab.array
    c = {n: _centroid(L == i) for n, i in ORGANS.items()}
    assert c["liver"][2] < 128 < c["spleen"][2]
    assert c["kidney_right"][2] < c["kidney_left"][2]
    assert c["inferior_vena_cava"][2] < c["aorta"][2]
    assert c["vertebrae"][1] > 0.55 * L.shape[1]
    assert c["vertebrae"][1] > c["aorta"][1] > c["pancreas"][1]
    # z toward superior: liver dome above the kidneys, the right kidney lower than the left
    assert _z_range(L == ORGANS["liver"])[1] > _z_range(L == ORGANS["kidney_right"])[1]
    assert c["kidney_right"][0] < c["kidney_left"][0]


def test_labels_consistent_with_image(default_phantom):
    """Outside the body (air in the image) there are no labels; every organ is inside."""
    ct, lab = default_phantom
    air = ct.array < -950
    labelled = lab.array > 0
    assert (air & labelled).sum() < 0.001 * labelled.sum()


def test_labels_change_smoothly_and_differently(default_phantom):
    _, lab = default_phantom
    L = lab.array
    below_one = 0
    for name, i in ORGANS.items():
        m = L == i
        z0, z1 = _z_range(m)
        dice = []
        for z in range(z0, z1):
            a, b = m[z], m[z + 1]
            dice.append(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))
        dice = np.array(dice)
        assert np.median(dice) > 0.8, (name, np.median(dice))
        if np.median(dice) < 0.999:
            below_one += 1
        if name not in ("aorta", "inferior_vena_cava", "vertebrae"):
            assert (dice < 0.995).mean() > 0.5, name  # shapes keep changing
    assert below_one >= 8
    extents = {name: _z_range(L == i) for name, i in ORGANS.items()}
    assert len(set(extents.values())) == len(extents), extents
    # the vertebrae repeat along z (discs): the label's area rises and falls periodically
    area = (L == ORGANS["vertebrae"]).sum(axis=(1, 2)).astype(float)
    assert area.min() > 0 and area.max() > 1.5 * area.min()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_organs_split_into_components(small_phantoms, seed):
    """The liver's lobes and the kidneys' pole lobules give slices with 2 components."""
    _, lab = small_phantoms[seed]
    L = lab.array

    def n_split(i):
        return sum(ndimage.label(L[z] == i)[1] >= 2 for z in range(L.shape[0]))

    assert n_split(ORGANS["liver"]) >= 2
    assert n_split(ORGANS["kidney_right"]) + n_split(ORGANS["kidney_left"]) >= 1
    # ... while the aorta stays one tube
    assert n_split(ORGANS["aorta"]) == 0


def test_anatomy_scales_with_physical_size(small_phantoms, default_phantom):
    """Same seed on a 2x finer grid over the same field of view: same organs in mm."""
    _, lab_s = small_phantoms[0]
    _, lab_d = default_phantom
    vox_s, vox_d = np.prod(SMALL_SPACING), np.prod((2.5, 1.2, 1.2))
    for name, i in ORGANS.items():
        v_s = (lab_s.array == i).sum() * vox_s
        v_d = (lab_d.array == i).sum() * vox_d
        tol = 0.35 if name in ("gallbladder", "pancreas", "vertebrae") else 0.15
        assert abs(v_s - v_d) / v_d < tol, (name, v_s, v_d)
        c_s = _centroid(lab_s.array == i)[1:] * SMALL_SPACING[1:]
        c_d = _centroid(lab_d.array == i)[1:] * (1.2, 1.2)
        assert np.abs(c_s - c_d).max() < 8.0, (name, c_s, c_d)


def test_anisotropic_spacing_keeps_round_shapes():
    """With y voxels twice the x voxels, the aorta is still round in millimetres."""
    _, lab = make_phantom((24, 64, 128), (10.0, 4.8, 2.4), seed=0)
    m = lab.array[14] == ORGANS["aorta"]
    ys, xs = np.nonzero(m)
    height_mm = (ys.max() - ys.min() + 1) * 4.8
    width_mm = (xs.max() - xs.min() + 1) * 2.4
    assert 0.7 < height_mm / width_mm < 1.4


# ----------------------------------------------------------------------------- CLI
def test_cli_sample_writes_readable_files(tmp_path):
    from napari_propseg.cli import main
    from napari_propseg.io import read_labels, read_volume

    out = tmp_path / "sample"
    rc = main(["sample", "--out", str(out), "--shape", "24", "64", "64", "--spacing", "10", "4.8", "4.8",
               "--seed", "3", "--preview"])
    assert rc == 0
    png = out / "phantom_preview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    ct = read_volume(out / "phantom_ct.nii.gz")
    lab = read_labels(out / "phantom_labels.nii.gz", ct)
    ref_ct, ref_lab = make_phantom((24, 64, 64), (10.0, 4.8, 4.8), 3)
    np.testing.assert_array_equal(ct.array, ref_ct.array)
    np.testing.assert_array_equal(lab.array, ref_lab.array)
    np.testing.assert_allclose(ct.spacing, (10.0, 4.8, 4.8))
    np.testing.assert_allclose(ct.origin, ref_ct.origin, atol=1e-4)
    names = json.loads((out / "labels.json").read_text())
    assert {int(k): v for k, v in names.items()} == PHANTOM_LABELS


def test_cli_sample_bad_input_exit_2(tmp_path, capsys):
    from napari_propseg.cli import main

    f = tmp_path / "file.txt"
    f.write_text("x")
    assert main(["sample", "--out", str(f)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["sample", "--out", str(tmp_path / "o"), "--shape", "2", "64", "64"]) == 2
    assert "too small" in capsys.readouterr().err
    assert not (tmp_path / "o" / "phantom_ct.nii.gz").exists()
