"""Export the model of a resumable training checkpoint as a weights-only file (fp16).

Used when a training run is stopped before it writes its own weights file:
    python scripts/ckpt_to_weights.py RUN/checkpoints/last.pt OUT.pt
"""
import sys

import torch

from napari_propseg.weights import save_weights

ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
state = {k: (v.half() if v.is_floating_point() else v) for k, v in ckpt["model"].items()}
net_cfg = ckpt["config"].get("network_config") or ckpt["config"]["network"]
save_weights(sys.argv[2], kind="stcn", config=net_cfg, state_dict=state,
             meta={"step": ckpt["step"], "note": "exported from checkpoint " + sys.argv[1]})
print("exported step", ckpt["step"], "to", sys.argv[2])
