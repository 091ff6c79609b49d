"""The CIFAR-10 ResNet of He et al. (2016, section 4.2), as trained by
Yerlan Idelbayev (github.com/akamaster/pytorch_resnet_cifar10): three stages
of 16/32/64 channels, option-A (zero-padding) shortcuts, global average
pooling and a linear 64->10 classifier, for 32x32 inputs.

Every ReLU is its own module so that each layer runs once per forward pass
(hookable) and guided backpropagation can reach all of them.
"""

import torch
import torch.nn.functional as F
from torch import nn

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels."""

    def __init__(self, planes):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, num_blocks=(3, 3, 3), num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        in_planes = 16
        stages = []
        for planes, blocks, stride in zip((16, 32, 64), num_blocks, (1, 2, 2)):
            layers = []
            for s in [stride] + [1] * (blocks - 1):
                layers.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
            stages.append(nn.Sequential(*layers))

        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.pool(out), 1))


def resnet20(num_classes=10):
    return CifarResNet((3, 3, 3), num_classes)


def resnet20_from_checkpoint(checkpoint):
    """A ResNet-20 with the weights of an already loaded checkpoint: the
    published ``{'state_dict', 'best_prec1'}`` dict, or a bare state dict;
    keys may carry the ``module.`` prefix of ``DataParallel``.

    Raises:
        KeyError, RuntimeError: for a checkpoint of another architecture
    """
    state = checkpoint.get("state_dict", checkpoint)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = resnet20(num_classes=state["linear.weight"].shape[0])
    model.load_state_dict(state)
    return model.eval()


def load_resnet20_checkpoint(path, map_location="cpu"):
    """Loads the published ResNet-20 checkpoint: a pickle of
    ``{'state_dict', 'best_prec1'}`` written by an old torch, with every key
    prefixed ``module.`` (it was saved from ``DataParallel``).

    It holds only tensors, an ``OrderedDict`` and a float, so it is read
    with ``weights_only=True``: no code from the file can run.
    """
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    return resnet20_from_checkpoint(checkpoint)
