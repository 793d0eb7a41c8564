"""ResNet backbone that returns conv2_x..conv5_x (strides 4, 8, 16, 32), paper §3.2.3.

The module keeps torchvision's parameter names (conv1, bn1, layer1..layer4) and drops only
avgpool and fc, so its state_dict loads into `torchvision.models.resnet50()` with just `fc.*`
missing — the weight converters rely on that.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn
import torchvision
from torch import Tensor

from dupr.config import BACKBONES

# Output channels of conv2_x..conv5_x.
_BASIC = (64, 128, 256, 512)
_BOTTLENECK = (256, 512, 1024, 2048)
CHANNELS = {
    "resnet18": _BASIC,
    "resnet34": _BASIC,
    "resnet50": _BOTTLENECK,
    "resnet101": _BOTTLENECK,
    "resnet152": _BOTTLENECK,
}


class ResNetBackbone(nn.Module):
    def __init__(self, name: str = "resnet50", norm_layer: Callable[..., nn.Module] | None = None):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"backbone={name!r}: unknown (valid: {', '.join(BACKBONES)})")
        # weights=None: random init; nothing is ever downloaded.
        net = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        self.channels: tuple[int, ...] = CHANNELS[name]

    def forward(self, x: Tensor, up_to: int = 3) -> list[Tensor]:
        """Feature maps of conv2_x..conv{up_to+2}_x; deeper stages are not computed."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for m, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            feats.append(x)
            if m == up_to:
                break
        return feats
