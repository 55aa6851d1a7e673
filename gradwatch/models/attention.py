"""Attention: a healthy pre-LayerNorm transformer encoder (a control: an identity path to every layer)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradwatch import tasks
from gradwatch.models.case import ReferenceCase
from gradwatch.models.recipe import Setup, adam, seeded
from gradwatch.models.registry import register_model


class TinyTransformer(nn.Module):
    """Token and position embeddings, a pre-LayerNorm transformer encoder, mean pooling, ``head``."""

    def __init__(self, vocab: int, length: int, d_model: int, heads: int, layers: int, classes: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(length, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=2 * d_model, dropout=0.0, activation=nn.GELU(),
            batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.encoder(self.embed(tokens) + self.pos(positions))
        return self.head(self.norm(x).mean(dim=1))


@register_model
def transformer_preln(seed: int = 0) -> ReferenceCase:
    """Healthy control: a 2-layer pre-LayerNorm transformer encoder."""
    length, vocab = 16, 4
    model = TinyTransformer(vocab, length, d_model=32, heads=4, layers=2, classes=vocab)
    data = tasks.majority_token_sequences(seeded(seed), length=length, vocab=vocab)
    return Setup(model, data, adam(3e-3), batch_size=64, default_steps=100).case(
        "transformer_preln", seed, problem=None, twin=None, cure=(),
        description=(
            "Healthy control: a 2-layer pre-LayerNorm transformer encoder (d_model 32, 4 heads, GELU) "
            "naming the most frequent token of a 16-token sequence. Pre-LN keeps an identity path "
            "from the loss to every layer, so gradients neither vanish nor explode."
        ),
    )
