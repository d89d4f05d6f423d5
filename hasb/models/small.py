"""Small networks for fast tests and the CPU demo."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SmallCNN(nn.Module):
    """conv(→16) → BN → ReLU → conv(→32, stride 2) → BN → ReLU → depthwise+grouped convs → FC.

    A few ten-thousand parameters; covers strided, grouped and depthwise convs and Linear.
    """

    def __init__(self, num_classes=10, in_channels=1, width=16):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * w)
        self.conv3 = nn.Conv2d(2 * w, 2 * w, 3, 2, 1, groups=2 * w, bias=False)  # depthwise
        self.bn3 = nn.BatchNorm2d(2 * w)
        self.conv4 = nn.Conv2d(2 * w, 4 * w, 3, 1, 1, groups=2, bias=False)  # grouped
        self.bn4 = nn.BatchNorm2d(4 * w)
        self.fc1 = nn.Linear(4 * w, 4 * w)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.relu(self.bn4(self.conv4(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(F.relu(self.fc1(x)))


class TinyMLP(nn.Module):
    """Two hidden Linear layers; small enough for an exact Hessian in tests."""

    def __init__(self, num_classes=10, in_channels=1, image_size=28, hidden=16):
        super().__init__()
        self.fc1 = nn.Linear(in_channels * image_size * image_size, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def small_cnn(num_classes=10, in_channels=1, **_):
    return SmallCNN(num_classes, in_channels)


def tiny_mlp(num_classes=10, in_channels=1, image_size=28, **_):
    return TinyMLP(num_classes, in_channels, image_size)
