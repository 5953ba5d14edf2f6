"""DistributedDataParallel path of the propagation trainer: 2 CPU processes, gloo backend.

Each rank trains on its own samples (different losses) for 2 steps; if the gradients are
averaged across ranks, the parameters stay identical on both ranks, and only rank 0
writes logs, checkpoints and weights.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

TINY = {
    "seed": 11,
    "resolution": 64,
    "network": "cpu",
    "network_overrides": {"value_dim": 32, "decoder_dims": [16, 16, 16]},
    "stage0_steps": 1,
    "stage1_steps": 1,
    "batch_size": 1,
    "log_every": 1,
    "val_every": 100,
    "ckpt_every": 100,
    "weights_dtype": "float32",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, result_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "WORLD_SIZE": str(world), "PROPSEG_THREADS": "1"})
    torch.set_num_threads(1)
    from napari_propseg.phantom import make_phantom
    from napari_propseg.training.data import TrainingData, preprocess_volume
    from napari_propseg.training.propagation import train_propagation

    cases = []
    for seed in (1, 2):
        ct, lab = make_phantom((24, 64, 64), (6.0, 4.0, 4.0), seed=seed)
        cases.append(preprocess_volume(ct.array, lab.array, ct.spacing, 64, name=f"ph{seed}", kind="phantom"))
    data = TrainingData(resolution=64, phantoms=cases, phantom_ratio=1.0)
    record: dict = {"losses": []}

    def on_step(step, model, losses):
        record["losses"].append(float(losses["loss"]))
        record["world"] = torch.distributed.get_world_size()
        if step == 2:
            record["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    train_propagation(TINY, out_dir=out_dir, device="cpu", data=data, on_step=on_step)
    torch.save(record, os.path.join(result_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ddp_two_processes_keep_parameters_in_sync(tmp_path):
    out_dir, result_dir = tmp_path / "run", tmp_path / "res"
    result_dir.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(out_dir), str(result_dir)), nprocs=2, join=True)
    r0 = torch.load(result_dir / "rank0.pt", weights_only=True)
    r1 = torch.load(result_dir / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2
    # the ranks saw different samples ...
    assert r0["losses"] != r1["losses"]
    # ... yet their parameters are identical after 2 optimisation steps: gradients were averaged
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # training changed them: compare with the initial weights (same seed, same architecture)
    from napari_propseg.propagation.network import build_stcn
    from napari_propseg.training.common import seed_everything
    from napari_propseg.training.propagation import load_train_config
    from napari_propseg.weights import load_weights

    seed_everything(TINY["seed"])
    init = build_stcn(load_train_config(TINY)["network_config"]).state_dict()
    assert sum(not torch.equal(init[k], r0["state"][k]) for k in init) > len(init) // 2
    # rank 0 exported exactly its weights

    _, exported, meta = load_weights(out_dir / "stcn_propagation.pt", kind="stcn")
    assert meta["hardware"].startswith("2 x CPU")
    for k, v in exported.items():
        assert torch.equal(v, r0["state"][k]), k
    # only rank 0 logs: one row per step, each the mean loss of both ranks
    import csv

    rows = list(csv.DictReader(open(out_dir / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2]
    for i, row in enumerate(rows):
        assert float(row["loss"]) == pytest.approx((r0["losses"][i] + r1["losses"][i]) / 2, rel=1e-4)
