"""The prefix of a retrieval-fused decoder: the query vector fused with its nearest bank rows.

DeCap feeds the decoder one prefix token, a linear map of a single CLIP vector. A retrieval-fused decoder (IFCap,
EMNLP 2024; Knight) also sees the ``k`` bank sentences nearest to the query, as images will meet them: in training
the query is a caption's own embedding with noise and its neighbours exclude it (so training looks like inference,
where an image's nearest sentences never hold its exact caption); at caption time the query is the image.

Two ways to fuse (``DecoderConfig.fusion``)::

    tokens   [ P(q) + r_q, P(n_1) + r_n, ..., P(n_k) + r_n ]      1 + k prefix tokens, the blocks attend to all
    xattn    [ P(q) + r_q + CrossAttn(LN(P(q) + r_q), LN(P(n_i) + r_n)) ]      one token, as DeCap's

``P`` is the decoder's own prefix projection, ``r_q``/``r_n`` learned role embeddings; neighbours come nearest
first, so their positions carry their rank. ``xattn`` is IFCap's single cross-attention layer: the number of
neighbours may differ between training and captioning, and decoding costs what DeCap's does.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FUSIONS", "NeighbourFusion"]

FUSIONS = ("tokens", "xattn")


class NeighbourFusion(nn.Module):
    """Prefix tokens [B, P, C] from a query [B, D] and its neighbours [B, k, D] (see the module docstring)."""

    def __init__(self, n_embd: int, n_head: int, fusion: str, eps: float = 1e-5) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.fusion = fusion
        self.role = nn.Embedding(2, n_embd)  # 0: the query, 1: a neighbour
        if fusion == "xattn":
            self.ln_q = nn.LayerNorm(n_embd, eps=eps)
            self.ln_n = nn.LayerNorm(n_embd, eps=eps)
            self.attn = nn.MultiheadAttention(n_embd, n_head, batch_first=True)

    def forward(self, project: nn.Module, query: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        dtype = project.weight.dtype
        q = project(query.to(dtype)).unsqueeze(1) + self.role.weight[0]  # [B, 1, C]
        n = project(neighbours.to(dtype)) + self.role.weight[1]  # [B, k, C]
        if self.fusion == "tokens":
            return torch.cat([q, n], dim=1)
        keys = self.ln_n(n)
        fused, _ = self.attn(self.ln_q(q), keys, keys, need_weights=False)
        return q + fused

    def tokens(self, k: int) -> int:
        """Prefix positions for ``k`` neighbours."""
        return 1 + k if self.fusion == "tokens" else 1
