"""ResNets for the synthetic benchmarks (``resnet18/34/50/101``, torchvision's names and layer
counts, written here): an input ``(N, 3, H, W)`` of any size >= 32, 1000 classes by default."""
from __future__ import annotations

from typing import Any, List, Type, Union

from torch import Tensor, nn


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout)]


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(*_conv_bn(cin, width, 3, stride), nn.ReLU(inplace=True),
                                  *_conv_bn(width, cout, 3))
        self.short = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout \
            else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.short(x))


class Bottleneck(Basic):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        nn.Module.__init__(self)
        cout = width * self.expansion
        self.body = nn.Sequential(*_conv_bn(cin, width, 1), nn.ReLU(inplace=True),
                                  *_conv_bn(width, width, 3, stride), nn.ReLU(inplace=True),
                                  *_conv_bn(width, cout, 1))
        self.short = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout \
            else nn.Identity()
        self.relu = nn.ReLU(inplace=True)


class ResNet(nn.Module):
    def __init__(self, block: Type[Union[Basic, Bottleneck]], counts: List[int],
                 num_classes: int = 1000) -> None:
        super().__init__()
        layers: List[nn.Module] = [*_conv_bn(3, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        cin = 64
        for i, n in enumerate(counts):
            width = 64 * 2 ** i
            for j in range(n):
                layers.append(block(cin, width, 2 if j == 0 and i > 0 else 1))
                cin = width * block.expansion
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def resnet18(**kw: Any) -> ResNet:
    return ResNet(Basic, [2, 2, 2, 2], **kw)


def resnet34(**kw: Any) -> ResNet:
    return ResNet(Basic, [3, 4, 6, 3], **kw)


def resnet50(**kw: Any) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], **kw)


def resnet101(**kw: Any) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], **kw)
