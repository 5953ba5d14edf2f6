"""Online adaptation of the STCN network to a volume's own anchors (tiny random-init
network on a small phantom, a few steps): the weights change, the loss on the anchor
clips falls, the loaded weights and the anchors stay untouched, caches are emptied,
cancel keeps the engine as it was, and the CLI flag is checked."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_propseg.cli import main as cli_main
from napari_propseg.errors import CancelledError, InputError
from napari_propseg.io import write_labels, write_volume
from napari_propseg.phantom import make_phantom
from napari_propseg.propagation.adapt import adapt_stcn
from napari_propseg.propagation.engine import PropagationEngine
from napari_propseg.propagation.network import CPU_CONFIG, build_stcn
from napari_propseg.weights import save_weights

RES = 32
ANCHORS = [4, 9, 14]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny random-init STCN weight file; one torch thread while this module runs."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROPSEG_THREADS", "1")  # the engine's device setup reads it
        torch.manual_seed(0)
        net = build_stcn(dict(CPU_CONFIG, resolution=RES))
        yield str(save_weights(tmp_path_factory.mktemp("w") / "stcn.pt", "stcn", net.config, net.state_dict(), {"note": "random init, tests only"}))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def phantom():
    ct, lab = make_phantom((18, 48, 48), (3.0, 4.0, 4.0), seed=3)
    return ct, lab


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _engine(ct, weights, **kw):
    return PropagationEngine(ct.array, weights=weights, device="cpu", spacing=ct.spacing, **kw)


@pytest.mark.slow
def test_adaptation_changes_a_copy_and_lowers_the_anchor_clip_loss(phantom, weights):
    ct, lab = phantom
    eng = _engine(ct, weights)
    base = eng.model
    before = _state(base)
    res = eng.adapt(lab.array, ANCHORS, steps=12, eval_clips=4)
    # the loaded network is untouched, the engine now uses a different (adapted) one
    assert eng.model is not base
    for k, v in _state(base).items():
        assert torch.equal(v, before[k]), k
    changed = [k for k, v in eng.model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2
    assert res.steps == 12 and len(res.losses) == 12 and res.anchors == len(ANCHORS) and res.seconds > 0
    assert res.loss_after < res.loss_before
    assert eng.adaptation is res
    eng.reset_adaptation()
    assert eng.model is base and eng.adaptation is None


@pytest.mark.slow
def test_adapted_propagation_keeps_anchors_and_recomputes_keys(phantom, weights):
    ct, lab = phantom
    seeds = np.zeros_like(lab.array)
    seeds[ANCHORS] = lab.array[ANCHORS]
    plain = _engine(ct, weights)
    ref = plain.propagate(seeds, ANCHORS)
    assert plain.adaptation is None  # default: off

    eng = _engine(ct, weights, adapt_steps=3, adapt_options={"lr": 1e-3})
    eng.propagate(seeds, ANCHORS)  # fills the caches with the weights adapted to these anchors
    first = eng.adaptation
    keys_first = eng.stats["keys_encoded"]
    res = eng.propagate(seeds, ANCHORS)  # same anchors: no second adaptation, cached keys reused
    assert eng.adaptation is first and eng.stats["keys_encoded"] == keys_first
    for a in ANCHORS:
        assert np.array_equal(res.labels[a], seeds[a])
    assert not np.array_equal(res.labels, ref.labels)  # the adapted weights were used

    eng.adapt(seeds, ANCHORS, steps=2)  # new weights: every key is encoded again
    assert eng.adaptation is not first and not eng.network.keys and not eng.network.values
    eng.propagate(seeds, ANCHORS)
    assert eng.stats["keys_encoded"] == 2 * keys_first


@pytest.mark.slow
def test_cancel_keeps_the_engine_weights(phantom, weights):
    ct, lab = phantom
    eng = _engine(ct, weights)
    base = eng.model
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(CancelledError):
        eng.adapt(lab.array, ANCHORS, steps=20, cancel=cancel)
    assert len(calls) == 3  # stopped at the third step
    assert eng.model is base and eng.adaptation is None


def test_bad_adaptation_requests(phantom, weights):
    ct, lab = phantom
    with pytest.raises(InputError, match="adapt_steps"):
        _engine(ct, weights, adapt_steps=-1)
    with pytest.raises(InputError, match="method='stcn'"):
        PropagationEngine(ct.array, method="interp", adapt_steps=5)
    with pytest.raises(InputError, match="Unknown adaptation option"):
        _engine(ct, weights, adapt_options={"learning_rate": 1.0})
    eng = _engine(ct, weights)
    empty = np.zeros_like(lab.array)
    with pytest.raises(InputError, match="No anchor slice holds an organ"):
        eng.adapt(empty, ANCHORS, steps=2)
    with pytest.raises(InputError, match="0 or more"):
        adapt_stcn(eng.model, np.zeros((2, 3, RES, RES), np.float32), np.zeros((2, RES, RES), np.uint8), steps=-2)


@pytest.mark.slow
def test_cli_adapt_steps(phantom, weights, tmp_path, capsys):
    ct, lab = phantom
    img = tmp_path / "ct.nii.gz"
    write_volume(ct.array.astype(np.int16), ct, img)
    seeds = np.zeros_like(lab.array)
    seeds[ANCHORS] = lab.array[ANCHORS]
    seed_path = tmp_path / "seeds.nii.gz"
    write_labels(seeds, ct, seed_path)
    out = tmp_path / "out.nii.gz"
    base = ["propagate", str(img), "--seeds", str(seed_path), "--out", str(out), "--weights", weights, "--device", "cpu", "--quiet"]
    with pytest.raises(SystemExit) as exc:
        cli_main(base + ["--adapt-steps", "-3"])
    assert exc.value.code == 2 and "give 0 or more" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(base + ["--adapt-steps", "many"])
    assert exc.value.code == 2
    assert cli_main(base + ["--adapt-steps", "2", "--method", "interp"]) == 2
    assert "cannot be used with --method interp" in capsys.readouterr().err
    assert cli_main(base + ["--adapt-steps", "2"]) == 0
    assert "by stcn" in capsys.readouterr().out and out.is_file()
