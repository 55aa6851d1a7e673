"""Convolutional networks: a plain deep sigmoid CNN (vanishing) and a healthy small ResNet."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from gradwatch import tasks
from gradwatch.models.case import ReferenceCase
from gradwatch.models.recipe import Setup, seeded, sgd
from gradwatch.models.registry import register_model, register_twins


def plain_convnet(
    channels: int, depth: int, classes: int, activation: type[nn.Module], batchnorm: bool = False
) -> nn.Sequential:
    """``depth`` 3x3 convolutions (each optionally followed by BatchNorm) with activations, then
    global average pooling and a linear ``head``.

    Names are ``conv1, [bn1,] act1, ..., pool, flatten, head``; the BatchNorm variant has the
    plain one's parameters plus ``bn*``, as inserting BatchNorm into it would give.
    """
    layers: list[tuple[str, nn.Module]] = []
    in_channels = 1
    for i in range(1, depth + 1):
        layers.append((f"conv{i}", nn.Conv2d(in_channels, channels, 3, padding=1)))
        if batchnorm:
            layers.append((f"bn{i}", nn.BatchNorm2d(channels)))
        layers.append((f"act{i}", activation()))
        in_channels = channels
    layers += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("head", nn.Linear(channels, classes))]
    return nn.Sequential(OrderedDict(layers))


class BasicBlock(nn.Module):
    """ResNet basic block: ``act2(x + bn2(conv2(act1(bn1(conv1(x))))))``, shape-preserving."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act2(x + self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))


# ----------------------------------------------------------------------------------------------
# Plain deep CNN without normalisation: vanishing

CNN_DEPTH = 10
CNN_CHANNELS = 8


def _plain_cnn(seed: int, fixed: bool) -> Setup:
    model = plain_convnet(CNN_CHANNELS, CNN_DEPTH, 4, nn.Sigmoid, batchnorm=fixed)
    return Setup(model, tasks.grating_images(seeded(seed)), sgd(0.2), batch_size=32, default_steps=150)


plain_cnn, plain_cnn_fixed = register_twins(
    "plain_cnn", _plain_cnn, problem="vanishing", cure=("insert_batchnorm",),
    summaries=("Vanishing: a 10-conv sigmoid CNN without normalisation (cure: insert_batchnorm).",
               "Twin of ``plain_cnn``: a BatchNorm2d after every convolution."),
    description=(
        "Vanishing gradients in a plain CNN: 10 3x3 convolutions with sigmoids and no "
        "normalisation (PyTorch default init) classifying the orientation of noisy 16x16 "
        "gratings. As in the sigmoid MLP, every layer multiplies the gradient by sigmoid' <= "
        "0.25 and a weight of gain < 1; the input-dependent part of the signal fades the same "
        "way forward. conv1's gradient is ~1e-9 of the head's; the loss stays at chance. "
        "Cure: insert_batchnorm after every convolution. BatchNorm rescales each layer's "
        "pre-activations to unit variance, which keeps the sigmoids in their sensitive range "
        "and, backwards, multiplies the gradient by 1/std of the (small) pre-activations, "
        "cancelling the per-layer shrinkage."
    ),
    fixed_description=(
        "Fixed twin of plain_cnn: the same convolutions and sigmoids with a BatchNorm2d after "
        "every convolution (conv{i} -> bn{i} -> act{i}), what insert_batchnorm makes of it."
    ),
)


# ----------------------------------------------------------------------------------------------
# Healthy control


@register_model
def resnet_bn(seed: int = 0) -> ReferenceCase:
    """Healthy control: a small ResNet with BatchNorm and Kaiming init."""
    channels = 16
    model = nn.Sequential(OrderedDict([
        ("stem", nn.Conv2d(1, channels, 3, padding=1, bias=False)),
        ("stem_bn", nn.BatchNorm2d(channels)),
        ("stem_act", nn.ReLU()),
        ("block1", BasicBlock(channels)),
        ("block2", BasicBlock(channels)),
        ("pool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("head", nn.Linear(channels, 4)),
    ]))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    setup = Setup(model, tasks.grating_images(seeded(seed)), sgd(0.05), batch_size=32, default_steps=60)
    return setup.case(
        "resnet_bn", seed, problem=None, twin=None, cure=(),
        description=(
            "Healthy control: a small ResNet (stem + 2 basic blocks, 16 channels) with BatchNorm and "
            "Kaiming init, on the grating images. Identity shortcuts and normalisation keep "
            "gradients at a similar scale in every layer."
        ),
    )
