"""Small synthetic tasks for the reference models, generated in-process (no downloads).

Every task is a pair of tensors ``(inputs, targets)`` drawn from a caller-supplied
``torch.Generator``, so a task is a pure function of its seed: the same seed gives bitwise the
same data, and a problem model and its fixed twin built from one seed train on the same data.
Targets are class indices for ``nn.CrossEntropyLoss``: its chance level (``log(classes)``) is
the loss a model that learns nothing settles at, which makes "the fix halves the loss" a
statement about learning, not about output scale.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def teacher_classification(
    generator: torch.Generator, n: int = 1024, features: int = 16, classes: int = 4
) -> tuple[Tensor, Tensor]:
    """Gaussian points labelled by a random linear teacher (``argmax(x @ W)``).

    Linearly separable, so any healthy network learns it in a few hundred SGD steps, while a
    network whose early layers receive no gradient (or whose forward pass has lost the input)
    stays at chance.

    Args:
        generator: source of randomness for the points and the teacher.
        n: number of examples. Default: ``1024``.
        features: input dimension. Default: ``16``.
        classes: number of classes. Default: ``4``.

    Returns:
        ``(inputs, targets)`` of shapes ``(n, features)`` and ``(n,)`` (int64).
    """
    inputs = torch.randn(n, features, generator=generator)
    teacher = torch.randn(features, classes, generator=generator)
    return inputs, (inputs @ teacher).argmax(dim=1)


def grating_images(
    generator: torch.Generator, n: int = 512, size: int = 16, classes: int = 4, noise: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Noisy sinusoidal gratings whose orientation is the class.

    Orientation is a local, translation-invariant signal: a 3x3 convolution sees it anywhere in
    the image, so a CNN with global average pooling learns it quickly, provided gradients reach
    its convolutions. Phase and spatial frequency are random, so no single pixel gives the
    class away.

    Args:
        generator: source of randomness for phases, frequencies and noise.
        n: number of images. Default: ``512``.
        size: height and width in pixels. Default: ``16``.
        classes: number of orientations, evenly spaced over 180 degrees. Default: ``4``.
        noise: standard deviation of the additive Gaussian pixel noise. Default: ``0.5``.

    Returns:
        ``(images, targets)`` of shapes ``(n, 1, size, size)`` and ``(n,)`` (int64).
    """
    targets = torch.randint(0, classes, (n,), generator=generator)
    angle = targets.float() * (math.pi / classes)
    frequency = 0.6 + 0.4 * torch.rand(n, generator=generator)  # radians per pixel
    phase = 2 * math.pi * torch.rand(n, generator=generator)
    coords = torch.arange(size, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    along = cols * torch.cos(angle)[:, None, None] + rows * torch.sin(angle)[:, None, None]
    images = torch.sin(frequency[:, None, None] * along + phase[:, None, None])
    images = images + noise * torch.randn(images.shape, generator=generator)
    return images.unsqueeze(1), targets


def first_token_sequences(
    generator: torch.Generator, n: int = 1024, length: int = 50, noise: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Binary label written at ``t=0`` (as -1/+1), followed by ``length - 1`` steps of noise.

    The answer is only at the start, so the loss at the last step reaches the weights that could
    learn it only through ``length`` steps of recurrence: the long-range task where a vanilla
    RNN's gradient vanishes through time and a gated cell's additive memory does not.

    Args:
        generator: source of randomness for labels and noise.
        n: number of sequences. Default: ``1024``.
        length: number of time steps. Default: ``50``.
        noise: standard deviation of the distractor inputs after ``t=0``. Default: ``1.0``.

    Returns:
        ``(inputs, targets)`` of shapes ``(n, length, 1)`` (batch first) and ``(n,)`` (int64).
    """
    targets = torch.randint(0, 2, (n,), generator=generator)
    inputs = noise * torch.randn(n, length, 1, generator=generator)
    inputs[:, 0, 0] = 2.0 * targets.float() - 1.0
    return inputs, targets


def recent_token_sequences(
    generator: torch.Generator, n: int = 1024, length: int = 30, classes: int = 4, lag: int = 1
) -> tuple[Tensor, Tensor]:
    """One-hot token sequences labelled by the token ``lag`` steps before the last one.

    A short-range task: the answer is ``lag`` steps back, so it needs a little memory (a
    recurrent weight that carries one step of input), but no long-range credit assignment. That
    isolates exploding gradients, whose huge updates wreck the recurrent weights, from vanishing
    ones.

    Args:
        generator: source of randomness for the tokens.
        n: number of sequences. Default: ``1024``.
        length: number of time steps. Default: ``30``.
        classes: vocabulary size, which is also the number of classes. Default: ``4``.
        lag: how many steps before the last the answer sits. Default: ``1``.

    Returns:
        ``(inputs, targets)`` of shapes ``(n, length, classes)`` (batch first) and ``(n,)`` (int64).
    """
    if not 0 <= lag < length:
        raise ValueError(f"lag={lag} must be in [0, {length - 1}]")
    tokens = torch.randint(0, classes, (n, length), generator=generator)
    inputs = torch.nn.functional.one_hot(tokens, classes).float()
    return inputs, tokens[:, length - 1 - lag]


def majority_token_sequences(
    generator: torch.Generator, n: int = 1024, length: int = 16, vocab: int = 4
) -> tuple[Tensor, Tensor]:
    """Integer token sequences labelled by their most frequent token (ties: the smallest).

    Every position matters, so the model has to pool over the whole sequence: a natural task
    for self-attention followed by mean pooling.

    Args:
        generator: source of randomness for the tokens.
        n: number of sequences. Default: ``1024``.
        length: number of tokens per sequence. Default: ``16``.
        vocab: vocabulary size, which is also the number of classes. Default: ``4``.

    Returns:
        ``(tokens, targets)`` of shapes ``(n, length)`` and ``(n,)``, both int64.
    """
    tokens = torch.randint(0, vocab, (n, length), generator=generator)
    counts = torch.nn.functional.one_hot(tokens, vocab).sum(dim=1)
    return tokens, counts.argmax(dim=1)
