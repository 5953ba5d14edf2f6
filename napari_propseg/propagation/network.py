"""STCN (Cheng et al., "Rethinking Space-Time Networks with Improved Memory Coverage for
Efficient Video Object Segmentation", NeurIPS 2021) adapted to CT slices, torch only.

Axial slices play the role of video frames. One network serves training (:meth:`STCN.forward`,
a clip propagated frame by frame) and inference (the engine calls :meth:`STCN.encode_key`,
:meth:`STCN.encode_value` and :meth:`STCN.segment` itself, with its own bounded memory).

* Key encoder: ResNet-50 (or ResNet-18 in the CPU variant) up to layer3 (stride 16), then a
  3x3 convolution to a ``key_dim``-channel key. Its layer2/layer1 features are the
  decoder's skips.
* Value encoder: ResNet-18 up to layer3 on 5 channels (3 CT windows + the object's mask +
  the union of the other objects), fused with the key encoder's layer3 feature
  (:class:`FeatureFusionBlock`: residual blocks with CBAM attention) into ``value_dim``
  channels.
* Memory read: affinity ``(2 k_m^T k_q - ||k_m||^2) / sqrt(Ck)`` (negative squared L2
  distance; the ``||k_q||^2`` term is constant per query and cancels in the softmax), only
  the ``top_k`` best memory positions per query are kept and renormalised. One affinity
  per slice is shared by all objects.
* Decoder: 1/16 -> 1/8 -> 1/4 with skip connections, then bilinear upsampling to full size;
  per-object probabilities are combined by soft aggregation (background =
  prod(1 - p); logits = log(p / (1 - p)); softmax), so labels are mutually exclusive.

Example:
    >>> import torch
    >>> net = build_stcn(dict(CPU_CONFIG, resolution=64))
    >>> frames = torch.rand(1, 3, 3, 64, 64)          # B, T, 3, H, W
    >>> masks = torch.zeros(1, 2, 64, 64); masks[:, 0, 10:30, 10:30] = 1
    >>> tuple(net(frames, masks).shape)               # B, T-1, K+1, H, W
    (1, 2, 3, 64, 64)
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .resnet import BACKBONES, NORMS

log = logging.getLogger(__name__)

#: The published STCN architecture at a 384-pixel working resolution (GPU default).
DEFAULT_CONFIG: dict[str, Any] = {
    "key_backbone": "resnet50",
    "value_backbone": "resnet18",
    "key_dim": 64,
    "value_dim": 512,
    "decoder_dims": [512, 256, 256],
    "top_k": 20,
    "resolution": 384,
    "norm": "group",
}

#: Smaller variant for CPUs: ResNet-18 key encoder, narrower values/decoder, 256 pixels.
CPU_CONFIG: dict[str, Any] = {
    "key_backbone": "resnet18",
    "value_backbone": "resnet18",
    "key_dim": 64,
    "value_dim": 256,
    "decoder_dims": [128, 64, 32],
    "top_k": 20,
    "resolution": 256,
    "norm": "group",
}

_EPS = 1e-7


# --------------------------------------------------------------------------- blocks
class ResBlock(nn.Module):
    """Pre-activation residual block of two 3x3 convolutions (STCN's decoder unit).

    Args:
        cin: input channels; a 3x3 projection matches ``cout`` when they differ.
        cout: output channels. Shape (B, cin, H, W) -> (B, cout, H, W).
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.downsample = None if cin == cout else nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.conv2(F.relu(self.conv1(F.relu(x))))
        if self.downsample is not None:
            x = self.downsample(x)
        return x + r


class ChannelGate(nn.Module):
    """CBAM channel attention: shared MLP over average- and max-pooled descriptors."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3)))  # B, C
        return x * torch.sigmoid(att)[:, :, None, None]


class SpatialGate(nn.Module):
    """CBAM spatial attention: 7x7 convolution over channel max and mean maps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)  # B, 2, H, W
        return x * torch.sigmoid(self.conv(pooled))


class FeatureFusionBlock(nn.Module):
    """Fuse the value trunk's layer3 feature with the key encoder's (STCN).

    ``x = ResBlock(cat(v, k)); x = ResBlock(x + CBAM(x))``.

    Args:
        cin: value trunk channels + key trunk channels.
        cout: ``value_dim``.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.block1 = ResBlock(cin, cout)
        self.attention = nn.Sequential(ChannelGate(cout), SpatialGate())
        self.block2 = ResBlock(cout, cout)

    def forward(self, v16: torch.Tensor, k16: torch.Tensor) -> torch.Tensor:
        x = self.block1(torch.cat([v16, k16], dim=1))
        return self.block2(x + self.attention(x))


class UpsampleBlock(nn.Module):
    """Decoder stage: project the skip feature, add the 2x upsampled coarse feature, ResBlock.

    The skip projection does not depend on the object, so it is computed once per slice
    and repeated for the K objects.

    Args:
        skip_c: channels of the key encoder's skip feature.
        up_c: channels of the coarse (object) feature.
        out_c: output channels.
    """

    def __init__(self, skip_c: int, up_c: int, out_c: int) -> None:
        super().__init__()
        self.skip_conv = nn.Conv2d(skip_c, up_c, 3, padding=1)
        self.out_conv = ResBlock(up_c, out_c)

    def forward(self, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Args:
            skip: (B, skip_c, 2h, 2w) key-encoder feature.
            up: (B*K, up_c, h, w) object features, objects of one slice adjacent.

        Returns:
            (B*K, out_c, 2h, 2w).
        """
        k = up.shape[0] // skip.shape[0]
        s = self.skip_conv(skip)
        if k > 1:
            s = s.repeat_interleave(k, dim=0)
        x = s + F.interpolate(up, size=s.shape[-2:], mode="bilinear", align_corners=False)
        return self.out_conv(x)


class Decoder(nn.Module):
    """1/16 -> 1/8 -> 1/4 -> full-size logit of one object.

    Args:
        cin: channels of the 1/16 input (memory readout + compressed query feature).
        skip8: key encoder layer2 channels.
        skip4: key encoder layer1 channels.
        dims: (d16, d8, d4) widths of the three stages.
    """

    def __init__(self, cin: int, skip8: int, skip4: int, dims: tuple[int, int, int]) -> None:
        super().__init__()
        d16, d8, d4 = dims
        self.compress = ResBlock(cin, d16)
        self.up_16_8 = UpsampleBlock(skip8, d16, d8)
        self.up_8_4 = UpsampleBlock(skip4, d8, d4)
        self.pred = nn.Conv2d(d4, 1, 3, padding=1)

    def forward(self, x16: torch.Tensor, f8: torch.Tensor, f4: torch.Tensor) -> torch.Tensor:
        """Args:
            x16: (B*K, cin, h, w). f8: (B, skip8, 2h, 2w). f4: (B, skip4, 4h, 4w).

        Returns:
            (B*K, 1, 16h, 16w) logits.
        """
        x = self.compress(x16)
        x = self.up_16_8(f8, x)
        x = self.up_8_4(f4, x)
        x = self.pred(F.relu(x))
        return F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)

    def query(self, qv: torch.Tensor, f8: torch.Tensor, f4: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Inference: the parts of the decoder that depend on the slice alone, over the whole
        frame, for :meth:`decode_boxes` (computed once per slice and reused by every object
        and every pass through it).

        The first 1/16 convolutions see ``cat(mem, qv)``; a convolution of a concatenation
        is the sum of convolutions of its parts, so their query half is computed here.

        Args:
            qv: (1, Cv, h, w) compressed query feature. f8, f4: key-encoder skips.

        Returns:
            ``(q1, qd, s8, s4)``: the query half of ``compress.conv1`` (bias included), of
            ``compress.downsample`` (``qv`` itself when there is none) and both skip
            projections.
        """
        cv = qv.shape[1]
        comp = self.compress
        q1 = F.conv2d(F.relu(qv), comp.conv1.weight[:, cv:], comp.conv1.bias, padding=1)
        qd = qv if comp.downsample is None else F.conv2d(qv, comp.downsample.weight[:, cv:], comp.downsample.bias, padding=1)
        return q1, qd, self.up_16_8.skip_conv(f8), self.up_8_4.skip_conv(f4)

    def decode_boxes(self, mem: torch.Tensor, query: tuple[torch.Tensor, ...], boxes: list[tuple[int, int, int, int]]) -> list[torch.Tensor]:
        """Inference: each object decoded only inside its own box (the weights of
        :meth:`forward`). With a box of the whole frame the result equals :meth:`forward`
        up to rounding; with smaller boxes it differs only within the decoder's reach of
        the box edge.

        Args:
            mem: (K, Cv, h, w) memory readout of each object.
            query: :meth:`query` of the slice.
            boxes: K boxes ``(y0, y1, x0, x1)`` in 1/16 cells (end exclusive).

        Returns:
            K logits, object k's of shape (1, 1, 16 (y1 - y0), 16 (x1 - x0)).
        """
        q1, qd, s8, s4 = query
        cv = mem.shape[1]
        comp = self.compress
        w1m = comp.conv1.weight[:, :cv]
        wdm = None if comp.downsample is None else comp.downsample.weight[:, :cv]
        out = []
        for k, (y0, y1, x0, x1) in enumerate(boxes):
            m = mem[k:k + 1, :, y0:y1, x0:x1]
            h1 = F.conv2d(F.relu(m), w1m, None, padding=1) + q1[..., y0:y1, x0:x1]
            if wdm is None:
                skip = torch.cat([m, qd[..., y0:y1, x0:x1]], dim=1)
            else:
                skip = F.conv2d(m, wdm, None, padding=1) + qd[..., y0:y1, x0:x1]
            x = skip + comp.conv2(F.relu(h1))
            for up, sk in ((self.up_16_8, s8[..., 2 * y0:2 * y1, 2 * x0:2 * x1]), (self.up_8_4, s4[..., 4 * y0:4 * y1, 4 * x0:4 * x1])):
                x = up.out_conv(sk + F.interpolate(x, size=sk.shape[-2:], mode="bilinear", align_corners=False))
            x = self.pred(F.relu(x))
            out.append(F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False))
        return out


# --------------------------------------------------------------------------- functional core
def memory_affinity(mk: torch.Tensor, qk: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Top-k softmax affinity between memory and query keys (float32).

    ``A[m, q] = (2 mk_m . qk_q - ||mk_m||^2) / sqrt(Ck)``; per query column only the
    ``top_k`` largest entries are kept, exponentiated and renormalised to sum to 1, all
    others are exactly 0. ``top_k=None`` (or >= memory size) keeps every entry.

    Args:
        mk: (B, Ck, T, h, w) memory keys (T memory slices).
        qk: (B, Ck, h, w) query key.
        top_k: entries kept per query position.

    Returns:
        (B, T*h*w, h*w) float32, each column sums to 1.
    """
    b, ck = mk.shape[:2]
    with torch.autocast(device_type=mk.device.type, enabled=False):
        m = mk.reshape(b, ck, -1).float()  # B, Ck, THW
        q = qk.reshape(b, ck, -1).float()  # B, Ck, HW
        a_sq = m.pow(2).sum(1).unsqueeze(2)  # B, THW, 1
        ab = m.transpose(1, 2) @ q  # B, THW, HW
        aff = (2 * ab - a_sq) / math.sqrt(ck)  # B, THW, HW
        if top_k is None or top_k >= aff.shape[1]:
            return torch.softmax(aff, dim=1)
        values, indices = torch.topk(aff, k=top_k, dim=1)  # B, k, HW
        weights = torch.softmax(values, dim=1)
        return torch.zeros_like(aff).scatter_(1, indices, weights)


def aggregate(prob: torch.Tensor) -> torch.Tensor:
    """Soft aggregation of K independent object probabilities (STCN/STM).

    Args:
        prob: (B, K, H, W) per-object foreground probabilities in [0, 1].

    Returns:
        (B, K+1, H, W) logits, channel 0 = background with p = prod(1 - p_k);
        ``softmax(dim=1)`` of them gives mutually exclusive probabilities summing to 1.
    """
    bg = torch.prod(1 - prob, dim=1, keepdim=True)
    p = torch.cat([bg, prob], dim=1).clamp(_EPS, 1 - _EPS)
    return torch.log(p / (1 - p))


def others_union(masks: torch.Tensor) -> torch.Tensor:
    """For each object, the union (sum, clipped to [0, 1]) of all the other objects.

    Args:
        masks: (B, K, H, W) probabilities.

    Returns:
        (B, K, H, W).
    """
    return (masks.sum(dim=1, keepdim=True) - masks).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- network
def _check_config(config: dict) -> dict:
    cfg = dict(DEFAULT_CONFIG)
    cfg.update(config or {})
    for name in ("key_backbone", "value_backbone"):
        if cfg[name] not in BACKBONES:
            raise ValueError(f"config[{name!r}] = {cfg[name]!r}; use one of {', '.join(BACKBONES)}")
    if cfg["norm"] not in NORMS:
        raise ValueError(f"config['norm'] = {cfg['norm']!r}; use one of {', '.join(NORMS)}")
    for name in ("key_dim", "value_dim", "resolution"):
        if int(cfg[name]) <= 0:
            raise ValueError(f"config[{name!r}] must be positive, got {cfg[name]!r}")
    if int(cfg["resolution"]) % 16:
        raise ValueError(f"config['resolution'] must be a multiple of 16, got {cfg['resolution']!r}")
    if cfg["top_k"] is not None and int(cfg["top_k"]) <= 0:
        raise ValueError(f"config['top_k'] must be positive or None, got {cfg['top_k']!r}")
    dims = [int(d) for d in cfg["decoder_dims"]]
    if len(dims) != 3 or min(dims) <= 0:
        raise ValueError(f"config['decoder_dims'] must be three positive widths, got {cfg['decoder_dims']!r}")
    cfg["decoder_dims"] = dims
    return cfg


class STCN(nn.Module):
    """Space-time correspondence network over CT slices.

    Args:
        config: architecture (see :data:`DEFAULT_CONFIG`); missing keys take the defaults.

    Attributes:
        config: the full, validated config (saved in weight files).
    """

    def __init__(self, config: dict) -> None:
        super().__init__()
        cfg = _check_config(config)
        self.config = cfg
        norm = cfg["norm"]
        self.key_encoder = BACKBONES[cfg["key_backbone"]](in_channels=3, norm=norm)
        c16, c8, c4 = self.key_encoder.channels
        self.key_proj = nn.Conv2d(c16, cfg["key_dim"], 3, padding=1)
        nn.init.orthogonal_(self.key_proj.weight.data)
        nn.init.zeros_(self.key_proj.bias.data)
        self.key_comp = nn.Conv2d(c16, cfg["value_dim"], 3, padding=1)
        self.value_encoder = BACKBONES[cfg["value_backbone"]](in_channels=5, norm=norm)
        self.fuser = FeatureFusionBlock(self.value_encoder.channels[0] + c16, cfg["value_dim"])
        self.decoder = Decoder(2 * cfg["value_dim"], c8, c4, tuple(cfg["decoder_dims"]))

    @property
    def top_k(self) -> int | None:
        return None if self.config["top_k"] is None else int(self.config["top_k"])

    @property
    def resolution(self) -> int:
        """Working resolution (pixels per side) the network was built for."""
        return int(self.config["resolution"])

    # ------------------------------------------------------------------ pieces
    def encode_key(self, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode query/memory slices.

        Args:
            frame: (B, 3, H, W) windowed CT slices, H and W multiples of 16.

        Returns:
            key (B, Ck, H/16, W/16), f16 (B, C16, H/16, W/16), f8 (B, C8, H/8, W/8),
            f4 (B, C4, H/4, W/4).
        """
        if frame.ndim != 4 or frame.shape[1] != 3 or frame.shape[-1] % 16 or frame.shape[-2] % 16:
            raise ValueError(f"encode_key needs (B, 3, H, W) with H, W multiples of 16, got {tuple(frame.shape)}")
        f16, f8, f4 = self.key_encoder(frame)
        return self.key_proj(f16), f16, f8, f4

    def encode_value(self, frame: torch.Tensor, f16: torch.Tensor, masks: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """Encode memory values of K objects on one slice.

        Args:
            frame: (B, 3, H, W) windowed slice.
            f16: (B, C16, H/16, W/16) key-encoder layer3 feature of that slice.
            masks: (B, K, H, W) probability of each object.
            others: (B, K, H, W) union of the other objects (see :func:`others_union`).

        Returns:
            (B, K, Cv, H/16, W/16) values.
        """
        b, k = masks.shape[:2]
        x = torch.cat(
            [
                frame.unsqueeze(1).expand(-1, k, -1, -1, -1),
                masks.unsqueeze(2).to(frame.dtype),
                others.unsqueeze(2).to(frame.dtype),
            ],
            dim=2,
        ).flatten(0, 1)  # B*K, 5, H, W
        v16, _, _ = self.value_encoder(x)
        v = self.fuser(v16, f16.repeat_interleave(k, dim=0))  # B*K, Cv, h, w
        return v.view(b, k, *v.shape[1:])

    def encode_slice_values(self, frame: torch.Tensor, f16: torch.Tensor, masks: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """Inference: :meth:`encode_value` for one slice (B = 1), the parts every object shares
        computed once (equal up to rounding).

        Two convolutions see a concatenation whose other half is the same for every object,
        and a convolution of a concatenation is the sum of the convolutions of its parts:
        the value trunk's first convolution (the 3 CT channels beside each object's two
        masks) and the fuser's first block (the key feature beside each object's value
        feature). Their shared halves are computed once instead of K times.

        Args and returns: as :meth:`encode_value`, with B = 1.
        """
        b, k = masks.shape[:2]
        if b != 1:
            return self.encode_value(frame, f16, masks, others)
        ve = self.value_encoder
        stem = ve.conv1
        nf = frame.shape[1]
        shared = F.conv2d(frame, stem.weight[:, :nf], stem.bias, stride=stem.stride, padding=stem.padding)  # 1, 64, H/2, W/2
        own = torch.stack([masks, others], dim=2).flatten(0, 1).to(frame.dtype)  # K, 2, H, W
        x = shared + F.conv2d(own, stem.weight[:, nf:], None, stride=stem.stride, padding=stem.padding)
        v16 = ve.layer3(ve.layer2(ve.layer1(ve.maxpool(ve.relu(ve.bn1(x))))))  # K, C, h, w
        block = self.fuser.block1
        c = v16.shape[1]
        h1 = F.conv2d(F.relu(v16), block.conv1.weight[:, :c], None, padding=1) + F.conv2d(
            F.relu(f16), block.conv1.weight[:, c:], block.conv1.bias, padding=1)
        if block.downsample is not None:
            skip = F.conv2d(v16, block.downsample.weight[:, :c], None, padding=1) + F.conv2d(
                f16, block.downsample.weight[:, c:], block.downsample.bias, padding=1)
        else:
            skip = torch.cat([v16, f16.expand(k, -1, -1, -1)], dim=1)
        x = skip + block.conv2(F.relu(h1))
        v = self.fuser.block2(x + self.fuser.attention(x))
        return v.view(b, k, *v.shape[1:])

    def segment(
        self,
        qk: torch.Tensor,
        qf16: torch.Tensor,
        qf8: torch.Tensor,
        qf4: torch.Tensor,
        mk: torch.Tensor,
        mv: torch.Tensor,
        *,
        object_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Read the memory for every object and decode the query slice.

        Args:
            qk: (B, Ck, h, w) query key.
            qf16, qf8, qf4: query key-encoder features at 1/16, 1/8, 1/4.
            mk: (B, Ck, T, h, w) memory keys.
            mv: (B, K, Cv, T, h, w) memory values.
            object_mask: optional (B, K) bool/0-1; objects marked 0 (padding) get
                probability 0.

        Returns:
            (B, K+1, 16h, 16w) logits after soft aggregation (index 0 = background).
        """
        b, k, cv, t, h, w = mv.shape
        aff = memory_affinity(mk, qk, self.top_k)  # B, THW, HW (float32)
        mem = torch.bmm(mv.reshape(b, k * cv, t * h * w), aff.to(mv.dtype))  # B, K*Cv, HW
        mem = mem.view(b * k, cv, h, w)
        qv = self.key_comp(qf16)  # B, Cv, h, w
        x = torch.cat([mem.to(qv.dtype), qv.repeat_interleave(k, dim=0)], dim=1)  # B*K, 2Cv, h, w
        logit = self.decoder(x, qf8, qf4)  # B*K, 1, H, W
        prob = torch.sigmoid(logit.float()).view(b, k, *logit.shape[-2:])
        if object_mask is not None:
            prob = prob * object_mask.to(prob.dtype)[:, :, None, None]
        return aggregate(prob)

    def decoder_query(self, qf16: torch.Tensor, qf8: torch.Tensor, qf4: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Inference: the object-free part of decoding one slice (:meth:`Decoder.query`),
        for :meth:`segment_boxes`; depends on the slice alone, so callers cache it."""
        return self.decoder.query(self.key_comp(qf16), qf8, qf4)

    def segment_boxes(self, qk: torch.Tensor, query: tuple[torch.Tensor, ...], mk: torch.Tensor, mv: torch.Tensor,
                      boxes: list[tuple[int, int, int, int]]) -> torch.Tensor:
        """:meth:`segment` for one slice (B = 1) with each object decoded only inside its box.

        Inference only: an object has probability 0 outside its box (``(y0, y1, x0, x1)``
        in 1/16 cells), which the caller places around where the object can be (the
        engine: its extent on the previous slice, widened by a margin). Whole-frame boxes
        give :meth:`segment` up to rounding.

        Args:
            qk: (1, Ck, h, w) query key.
            query: :meth:`decoder_query` of the query slice.
            mk, mv: memory keys and values, as for :meth:`segment`.
            boxes: one box per object.

        Returns:
            (1, K+1, 16h, 16w) logits after soft aggregation (index 0 = background).
        """
        b, k, cv, t, h, w = mv.shape
        if b != 1 or len(boxes) != k:
            raise ValueError(f"segment_boxes needs one slice and one box per object, got batch {b}, {k} objects, {len(boxes)} boxes")
        aff = memory_affinity(mk, qk, self.top_k)  # 1, THW, HW (float32)
        mem = torch.bmm(mv.reshape(1, k * cv, t * h * w), aff.to(mv.dtype)).view(k, cv, h, w)
        logits = self.decoder.decode_boxes(mem.to(query[0].dtype), query, boxes)
        prob = torch.zeros((1, k, 16 * h, 16 * w), dtype=torch.float32, device=qk.device)
        for i, ((y0, y1, x0, x1), logit) in enumerate(zip(boxes, logits)):
            prob[0, i, 16 * y0:16 * y1, 16 * x0:16 * x1] = torch.sigmoid(logit.float())[0, 0]
        return aggregate(prob)

    # ------------------------------------------------------------------ training path
    def forward(self, frames: torch.Tensor, first_masks: torch.Tensor, num_objects: torch.Tensor | None = None) -> torch.Tensor:
        """Propagate the first frame's masks through a clip (training path).

        Frame 0 enters the memory with its ground-truth masks; each later frame is
        segmented from the memory of all previous frames, then enters the memory with its
        predicted soft masks.

        Args:
            frames: (B, T, 3, H, W) windowed slices, T >= 2.
            first_masks: (B, K, H, W) masks of the K objects on frame 0 (padding objects
                all zero).
            num_objects: optional (B,) number of real objects per clip; objects
                ``k >= num_objects[b]`` are padding and forced to probability 0.

        Returns:
            (B, T-1, K+1, H, W) logits for frames 1..T-1 (softmax over dim 2; index 0 =
            background).
        """
        b, t = frames.shape[:2]
        k = first_masks.shape[1]
        if t < 2:
            raise ValueError(f"forward needs at least 2 frames, got {t}")
        object_mask = None
        if num_objects is not None:
            object_mask = torch.arange(k, device=frames.device)[None, :] < num_objects.to(frames.device)[:, None]  # B, K
        key, f16, f8, f4 = self.encode_key(frames.flatten(0, 1))
        key, f16, f8, f4 = (x.view(b, t, *x.shape[1:]) for x in (key, f16, f8, f4))
        masks = first_masks if object_mask is None else first_masks * object_mask[:, :, None, None].to(first_masks.dtype)
        values = [self.encode_value(frames[:, 0], f16[:, 0], masks, others_union(masks))]  # each B, K, Cv, h, w
        outputs = []
        for i in range(1, t):
            mk = key[:, :i].transpose(1, 2)  # B, Ck, i, h, w
            mv = torch.stack(values, dim=3)  # B, K, Cv, i, h, w
            logits = self.segment(key[:, i], f16[:, i], f8[:, i], f4[:, i], mk, mv, object_mask=object_mask)
            outputs.append(logits)
            if i < t - 1:
                prob = torch.softmax(logits, dim=1)[:, 1:]
                values.append(self.encode_value(frames[:, i], f16[:, i], prob, others_union(prob)))
        return torch.stack(outputs, dim=1)


# --------------------------------------------------------------------------- construction/loading
def build_stcn(config: dict) -> STCN:
    """Build an STCN from an architecture config (missing keys take :data:`DEFAULT_CONFIG`).

    Raises:
        ValueError: an unknown backbone/norm or a bad size in ``config``.
    """
    return STCN(config)


def load_stcn(path: str | os.PathLike) -> STCN:
    """Load an STCN weight file written by :func:`napari_propseg.weights.save_weights`.

    The architecture is rebuilt from the file's config, then the state dict is loaded
    strictly (every mismatching key is logged). The model is returned in eval mode on CPU,
    with the file's ``meta`` dict as ``model.meta``.

    Raises:
        InputError: missing/unreadable file, not STCN weights, a config this version
            cannot build, or weights that do not match the architecture.
    """
    from ..weights import load_state_checked, load_weights

    config, state, meta = load_weights(path, kind="stcn")
    try:
        net = build_stcn(config)
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"Weight file {path} has an STCN config this version cannot build ({exc}); pass weights written by 'propseg train'.") from exc
    load_state_checked(net, state, path)
    net.eval()
    net.meta = dict(meta)  # provenance, incl. the training preprocessing (crop) inference must repeat
    log.info("loaded STCN weights %s (%s key encoder, %d px; meta %s)", path, net.config["key_backbone"], net.resolution, {k: meta[k] for k in list(meta)[:5]})
    return net
