"""`propseg propagate`: end to end on small files, and exit code 2 with one sentence on bad input."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from napari_propseg.cli import main
from napari_propseg.io import Volume, read_labels, read_volume, write_labels, write_volume
from napari_propseg.propagation.network import CPU_CONFIG, build_stcn
from napari_propseg.weights import save_weights


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def case(tmp_path):
    """A 10-slice CT (LPS, 2 x 0.8 x 0.8 mm) and seeds on slices 2 and 7."""
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 150, (10, 32, 28)).astype(np.int16)
    image = Volume.from_array(hu, spacing=(2.0, 0.8, 0.8), origin=(-10.0, 5.0, 30.0))
    seeds = np.zeros(hu.shape, np.uint8)
    yy, xx = np.mgrid[:32, :28]
    seeds[2][(yy - 14) ** 2 + (xx - 12) ** 2 <= 25] = 1
    seeds[7][(yy - 16) ** 2 + (xx - 13) ** 2 <= 49] = 1
    seeds[7, 26:30, 20:25] = 3
    write_volume(hu, image, tmp_path / "ct.nii.gz")
    write_labels(seeds, image, tmp_path / "seeds.nii.gz")
    return tmp_path, image, seeds


def _one_sentence_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("propseg propagate: error: "), err
    return err[0]


def test_interp_end_to_end(case, capsys):
    d, image, seeds = case
    rc = main(["propagate", str(d / "ct.nii.gz"), "--seeds", str(d / "seeds.nii.gz"), "--out", str(d / "out.nii.gz"), "--method", "interp"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    # interp fills the 4 slices between the anchors 2 and 7 and says that 0-1 and 8-9 stay empty
    assert "wrote" in captured.out and "4 slices filled from 2 anchor(s)" in captured.out
    assert "slices 0-1 and 8-9 lie outside the outermost anchors and were left empty" in captured.out
    assert captured.err == ""  # stderr is not a terminal here: no progress bar (see test_progress_bar_on_a_terminal)
    ct = read_volume(d / "ct.nii.gz")
    out = read_labels(d / "out.nii.gz", like=ct)
    assert out.array.shape == seeds.shape and ct.spacing == out.spacing
    for z in (2, 7):
        assert np.array_equal(out.array[z], seeds[z])
    assert (out.array[4] == 1).sum() > 0 and not out.array[:2].any() and not out.array[8:].any()


def test_stcn_with_weights_and_explicit_slices(case, capsys):
    d, _, seeds = case
    torch.manual_seed(0)
    net = build_stcn(dict(CPU_CONFIG, resolution=32))
    w = save_weights(d / "w.pt", "stcn", net.config, net.state_dict())
    rc = main(["propagate", str(d / "ct.nii.gz"), "--seeds", str(d / "seeds.nii.gz"), "--out", str(d / "out.nrrd"),
               "--weights", str(w), "--device", "cpu", "--slices", "2,5,7", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "7 slices filled from 3 anchor(s) by stcn" in captured.out and captured.err == ""
    out = read_labels(d / "out.nrrd", like=read_volume(d / "ct.nii.gz"))
    for z in (2, 5, 7):  # slice 5 is an empty anchor: "no organ here"
        assert np.array_equal(out.array[z], seeds[z])


def _run(d, *extra, method="interp"):
    return main(["propagate", str(d / "ct.nii.gz"), "--seeds", str(d / "seeds.nii.gz"), "--out", str(d / "out.nii.gz"), "--method", method, *extra])


def test_seeds_on_another_grid(case, capsys):
    d, image, seeds = case
    far = Volume.from_array(seeds, spacing=(2.0, 0.8, 0.8), origin=(400.0, 400.0, 400.0))
    write_labels(seeds, far, d / "seeds.nii.gz")
    assert _run(d) == 2
    _one_sentence_error(capsys)
    assert not (d / "out.nii.gz").exists()


def test_no_anchors(case, capsys):
    d, image, seeds = case
    write_labels(np.zeros_like(seeds), image, d / "seeds.nii.gz")
    assert _run(d) == 2
    assert "holds no labelled slice" in _one_sentence_error(capsys)


@pytest.mark.parametrize("slices,match", [("2,x", "comma-separated"), ("2,40", "outside"), ("-3", "comma-separated|negative")])
def test_bad_slices(case, capsys, slices, match):
    d, _, _ = case
    assert _run(d, "--slices", slices) == 2
    assert re.search(match, _one_sentence_error(capsys))


def test_unknown_device(case, capsys):
    d, _, _ = case
    assert _run(d, "--device", "tpu") == 2
    assert "Unknown device" in _one_sentence_error(capsys)


def test_weights_not_matching_the_architecture(case, capsys):
    d, _, _ = case
    net = build_stcn(dict(CPU_CONFIG, resolution=32))
    w = save_weights(d / "w.pt", "stcn", dict(net.config, value_dim=128), net.state_dict())
    assert _run(d, "--weights", str(w), "--device", "cpu", method="stcn") == 2
    assert "do not match the architecture" in _one_sentence_error(capsys)


def test_no_weights(case, capsys, monkeypatch):
    d, _, _ = case
    monkeypatch.setenv("PROPSEG_MODELS", str(d / "no_models_here"))
    assert _run(d, "--device", "cpu", method="stcn") == 2
    msg = _one_sentence_error(capsys)
    assert "No trained propagation weights" in msg and "--method interp" in msg


def test_progress_bar_on_a_terminal():
    import io

    from napari_propseg.cli.propagate import ProgressBar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term, pipe = Terminal(), io.StringIO()
    for stream in (term, pipe):
        bar = ProgressBar(stream)
        bar(1, 2, "interpolating slice 3")
        bar(2, 2, "interpolating slice 4")
    assert "interpolating slice" in term.getvalue() and "[" in term.getvalue() and term.getvalue().endswith("\n")
    assert pipe.getvalue() == ""
