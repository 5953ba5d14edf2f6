"""ResNet-18 / ResNet-50 trunks up to ``layer3`` (stride 16), torch only.

The STCN key and value encoders use the first three stages of a standard ResNet
(He et al. 2016): stem (7x7/2 conv, norm, ReLU, 3x3/2 max-pool) then ``layer1`` (stride
4), ``layer2`` (stride 8) and ``layer3`` (stride 16). ``layer4`` is never built.

Normalisation is selectable because propagation trains with batches of 1-4 clips:

* ``"group"``: GroupNorm with ``min(32, C)`` groups (batch-size independent; default),
* ``"frozen"``: BatchNorm with frozen statistics and affine parameters (buffers only),
* ``"batch"``: ordinary BatchNorm2d.

Example:
    >>> import torch
    >>> net = resnet18(in_channels=5)
    >>> f16, f8, f4 = net(torch.zeros(1, 5, 64, 64))
    >>> tuple(f16.shape), tuple(f8.shape), tuple(f4.shape)
    ((1, 256, 4, 4), (1, 128, 8, 8), (1, 64, 16, 16))
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

NORMS = ("group", "frozen", "batch")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine parameters are fixed buffers.

    Args:
        num_features: channels C. Input/output shape (B, C, H, W).
        eps: added to the variance.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


def norm_layer(kind: str) -> Callable[[int], nn.Module]:
    """Factory ``C -> nn.Module`` for the normalisation named ``kind`` (see :data:`NORMS`).

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == "group":
        return lambda c: nn.GroupNorm(min(32, c), c)
    if kind == "frozen":
        return FrozenBatchNorm2d
    if kind == "batch":
        return nn.BatchNorm2d
    raise ValueError(f"unknown norm {kind!r}; use one of {', '.join(NORMS)}")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34 unit).

    Args:
        cin: input channels.
        planes: output channels (expansion 1).
        stride: stride of the first convolution.
        norm: normalisation factory.
    """

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride=stride, bias=False), norm(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 bottleneck with a residual connection (ResNet-50 unit).

    Args:
        cin: input channels.
        planes: bottleneck channels; the output has ``4 * planes``.
        stride: stride of the 3x3 convolution (torchvision "v1.5" placement).
        norm: normalisation factory.
    """

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = norm(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride=stride, bias=False), norm(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNetTrunk(nn.Module):
    """ResNet stem + ``layer1..layer3``; returns the stride-16, 8 and 4 features.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: number of units in layer1..layer3, e.g. (2, 2, 2) for ResNet-18.
        in_channels: input channels (3 for the windowed slice, 5 with two masks).
        norm: ``"group"``, ``"frozen"`` or ``"batch"``.

    Attributes:
        channels: (C16, C8, C4) output channels of layer3, layer2, layer1.
    """

    def __init__(self, block: type, layers: tuple[int, int, int], in_channels: int = 3, norm: str = "group") -> None:
        super().__init__()
        nl = norm_layer(norm)
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nl(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._cin = 64
        self.layer1 = self._make_layer(block, 64, layers[0], 1, nl)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, nl)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, nl)
        e = block.expansion
        self.channels = (256 * e, 128 * e, 64 * e)
        self._init_weights()

    def _make_layer(self, block: type, planes: int, n: int, stride: int, nl: Callable[[int], nn.Module]) -> nn.Sequential:
        units = [block(self._cin, planes, stride, nl)]
        self._cin = planes * block.expansion
        units += [block(self._cin, planes, 1, nl) for _ in range(n - 1)]
        return nn.Sequential(*units)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # zero-init the last norm of each residual branch: every unit starts as identity
        for m in self.modules():
            last = getattr(m, "bn3", None) if isinstance(m, Bottleneck) else getattr(m, "bn2", None) if isinstance(m, BasicBlock) else None
            if isinstance(last, (nn.GroupNorm, nn.BatchNorm2d)):
                nn.init.zeros_(last.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Args:
            x: (B, in_channels, H, W), H and W multiples of 16.

        Returns:
            f16 (B, C16, H/16, W/16), f8 (B, C8, H/8, W/8), f4 (B, C4, H/4, W/4).
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f4 = self.layer1(x)
        f8 = self.layer2(f4)
        f16 = self.layer3(f8)
        return f16, f8, f4


def resnet18(in_channels: int = 3, norm: str = "group") -> ResNetTrunk:
    """ResNet-18 up to layer3: channels (256, 128, 64) at strides (16, 8, 4)."""
    return ResNetTrunk(BasicBlock, (2, 2, 2), in_channels, norm)


def resnet50(in_channels: int = 3, norm: str = "group") -> ResNetTrunk:
    """ResNet-50 up to layer3: channels (1024, 512, 256) at strides (16, 8, 4)."""
    return ResNetTrunk(Bottleneck, (3, 4, 6), in_channels, norm)


BACKBONES: dict[str, Callable[..., ResNetTrunk]] = {"resnet18": resnet18, "resnet50": resnet50}
