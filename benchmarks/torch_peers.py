"""PyTorch versions of the benchmark suite's architectures, for side-by-side speed runs.

Same layers, shapes and parameter counts as the resnet_jax models of the same names
(checked by `experiments.benchmark --against torch`). Written here rather than taken from
torchvision so that the benchmark needs only `torch`.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride, shortcut="projection"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.stride, self.out, self.kind = stride, width, shortcut
        self.downsample = None
        if (stride != 1 or cin != width) and shortcut == "projection":
            self.downsample = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False),
                                            nn.BatchNorm2d(width))

    def _shortcut(self, x):
        if self.downsample is not None:
            return self.downsample(x)
        if self.stride == 1 and x.shape[1] == self.out:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        extra = self.out - x.shape[1]
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self._shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride, shortcut="projection"):
        super().__init__()
        out = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


class ResNet(nn.Module):
    def __init__(self, stage_sizes, block, num_classes, widths=(64, 128, 256, 512), in_ch=3,
                 stem_width=64, stem_kernel=7, stem_stride=2, stem_pool=True,
                 shortcut="projection"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, stem_width, stem_kernel, stem_stride, stem_kernel // 2,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.pool = nn.MaxPool2d(3, 2, 1) if stem_pool else nn.Identity()
        layers, cin = [], stem_width
        for i, (n, w) in enumerate(zip(stage_sizes, widths)):
            for j in range(n):
                layers.append(block(cin, w, 2 if i > 0 and j == 0 else 1, shortcut))
                cin = w * block.expansion
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class PreActBlock(nn.Module):
    def __init__(self, cin, width):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, width, 3, 1, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(width), nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.proj = nn.Conv2d(cin, width, 1, bias=False) if cin != width else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        residual = self.proj(out) if self.proj is not None else x
        y = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return y + residual


class MnistPreAct(nn.Module):
    """conv 8; pre-activation blocks 16,16; pool; 32,32; pool; 64,64; BN-ReLU; dense 128; 10."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1, 1, bias=False)
        blocks, cin = [], 8
        for i, w in enumerate((16, 32, 64)):
            if i:
                blocks.append(nn.MaxPool2d(2))
            blocks += [PreActBlock(cin, w), PreActBlock(w, w)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.bn_final = nn.BatchNorm2d(64)
        self.fc_hidden, self.fc = nn.Linear(64, 128), nn.Linear(128, num_classes)

    def forward(self, x):
        x = F.relu(self.bn_final(self.blocks(self.conv1(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(F.relu(self.fc_hidden(x)))


class AlexNetOWT(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))
        self.classifier = nn.Sequential(
            nn.Linear(256 * 36, 4096), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4096, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 6)
        return self.classifier(torch.flatten(x, 1))


def cifar(depth: int, num_classes: int = 10) -> nn.Module:
    n = (depth - 2) // 6
    return ResNet((n, n, n), BasicBlock, num_classes, (16, 32, 64), 3, 16, 3, 1, False, "zero_pad")


PEERS = {
    "cifar_resnet20": lambda nc: cifar(20, nc),
    "cifar_resnet56": lambda nc: cifar(56, nc),
    "resnet18": lambda nc: ResNet((2, 2, 2, 2), BasicBlock, nc),
    "resnet50": lambda nc: ResNet((3, 4, 6, 3), Bottleneck, nc),
    "fashion_mnist_resnet50": lambda nc: ResNet((3, 4, 6, 3), Bottleneck, nc, in_ch=1),
    "fashion_mnist_resnet8": lambda nc: ResNet((1, 1, 1), BasicBlock, nc, (32, 64, 128), 1, 32,
                                               3, 2, False),
    "mnist_preact_resnet": lambda nc: MnistPreAct(nc),
    "alexnet_owt": lambda nc: AlexNetOWT(nc),
}
