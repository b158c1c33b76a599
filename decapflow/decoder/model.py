"""The DeCap decoder: a small GPT-2 that rebuilds a sentence from its CLIP embedding, in one readable file.

Input layout (identical to the official DeCap code, so its checkpoints load unchanged)::

    position   0                 1        2    ...  n+1
    input      W_p·v + b_p       <start>  w1   ...  wn        (v: the unit CLIP vector [prefix_dim])
    target     (<start>)         w1       w2   ...  <end>

The prefix token is one linear map of the CLIP vector; learned position embeddings cover the whole sequence
(prefix included); GPT-2 blocks (pre-LayerNorm, causal self-attention, 4× MLP with tanh-GELU); a final
LayerNorm; the output layer is tied to the token embedding. The official code trains on ``clip.tokenize``
output, so its captions include ``<start>`` and its prefix position learns to predict ``<start>``. We feed
``<start>`` explicitly after the prefix at generation time and do not train that trivial first target; the
result is the same whenever the model would pick ``<start>`` first (an official model always does).

Generation is batched and uses a key/value cache (each step runs only the newest token):
``generate(prefix, beam=1)`` is greedy, ``beam>1`` is beam search. Ids are the model's own (compact) ids;
``decode_texts`` turns prefixes straight into clean strings through a :class:`~decapflow.decoder.vocab.Vocab`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from decapflow import cpu
from decapflow.decoder.fusion import FUSIONS, NeighbourFusion
from decapflow.decoder.vocab import CLIP_VOCAB_SIZE, END_ID, START_ID

if TYPE_CHECKING:
    from decapflow.decoder.vocab import Vocab

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class DecoderConfig:
    """Architecture. ``prefix_dim``, ``vocab_size``, ``start_id`` and ``end_id`` come from the bank and the
    vocabulary (see :func:`load_config` overrides); the JSON configs only name the shape."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 768
    prefix_dim: int = 512  # CLIP embedding size
    block_size: int = 40  # max positions, prefix included
    vocab_size: int = CLIP_VOCAB_SIZE
    dropout: float = 0.1
    start_id: int = START_ID  # the model's id of <start> (compact id once a Vocab is used)
    end_id: int = END_ID
    layer_norm_eps: float = 1e-5
    #: Bank rows fused into the prefix (0: DeCap's single prefix token; see decapflow.decoder.fusion) and how.
    neighbors: int = 0
    fusion: str = "tokens"
    #: Tokens of the entity prompt read between the prefix and <start> (0: none), and how many neighbours must
    #: hold a token for it to be an entity (decapflow.decoder.entities).
    prompt_tokens: int = 0
    prompt_min_count: int = 0

    def __post_init__(self) -> None:
        if self.neighbors < 0 or self.fusion not in FUSIONS:
            raise ValueError(f"neighbors must be >= 0 and fusion one of {FUSIONS}, got {self.neighbors}, "
                             f"{self.fusion!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if not (0 <= self.start_id < self.vocab_size and 0 <= self.end_id < self.vocab_size):
            raise ValueError(f"start_id/end_id ({self.start_id}, {self.end_id}) outside vocab_size {self.vocab_size}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, **overrides: Any) -> DecoderConfig:
        """Parse a JSON object; keys starting with ``_`` (comments) are ignored, unknown keys are an error."""
        data = {k: v for k, v in json.loads(text).items() if not k.startswith("_")}
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(data) - known):
            raise ValueError(f"unknown decoder config keys {unknown}; known: {sorted(known)}")
        return cls(**{**data, **overrides})


def list_configs() -> list[str]:
    """Names of the bundled architectures (``decap-base``, ``decap-small``, ``tiny``, ...)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name_or_path: str | Path, **overrides: Any) -> DecoderConfig:
    """A bundled config by name, or a JSON file by path; ``overrides`` set fields (e.g. ``prefix_dim=512``)."""
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ValueError(f"no decoder config {str(name_or_path)!r}: use one of {list_configs()} or a JSON path")
    return DecoderConfig.from_json(path.read_text(), **overrides)


class KVCache:
    """Keys and values of every layer, preallocated for ``length`` positions: k, v [L, B, H, length, hd]."""

    def __init__(self, config: DecoderConfig, batch: int, length: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        hd = config.n_embd // config.n_head
        shape = (config.n_layer, batch, config.n_head, min(length, config.block_size), hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` [B'] (beam search reorders hypotheses)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # [B,H,T,hd]
        if cache is not None:
            start = cache.length
            cache.k[layer, :, :, start : start + T] = k
            cache.v[layer, :, :, start : start + T] = v
            k, v = cache.k[layer, :, :, : start + T], cache.v[layer, :, :, : start + T]  # [B,H,S,hd]
        S = k.size(2)
        mask = None
        if 1 < T < S:  # new queries after cached ones: query i sees keys up to S-T+i
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=(T == S and T > 1),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's gelu_new


class Block(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class DeCapDecoder(nn.Module):
    """Prefix projection + GPT-2 blocks + tied output layer. ``forward(prefix, ids) -> logits``."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.prefix_proj = nn.Linear(config.prefix_dim, config.n_embd)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.fusion = (NeighbourFusion(config.n_embd, config.n_head, config.fusion, config.layer_norm_eps)
                       if config.neighbors else None)
        if config.prompt_tokens:  # the share of training sentences holding each token (the entity prompt's baseline)
            self.register_buffer("token_df", torch.zeros(config.vocab_size))
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def fused(self) -> bool:
        """Whether the prefix fuses the query with its nearest bank rows (``neighbors`` > 0)."""
        return self.fusion is not None

    def prefix_len(self, k: int | None = None) -> int:
        """Prefix positions: 1, or for a fused decoder given ``k`` neighbours (default: as trained) 1 + k with
        ``tokens`` fusion and 1 with ``xattn``."""
        return self.fusion.tokens(self.config.neighbors if k is None else k) if self.fusion is not None else 1

    def forward(
        self, prefix: torch.Tensor | None, ids: torch.Tensor | None, cache: KVCache | None = None,
        neighbours: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T', V] for the sequence ``[prefix?, ids...]`` (T' = P + T with a prefix [B, D] of P positions,
        :meth:`prefix_len`; else T). A fused decoder's prefix also takes the query's ``neighbours`` [B, k, D].

        With a ``cache`` the new positions follow the cached ones and their keys/values are stored."""
        parts = []
        if prefix is not None and self.fusion is not None:
            if neighbours is None or neighbours.ndim != 3 or neighbours.size(0) != prefix.size(0):
                raise ValueError("a retrieval-fused decoder needs each prefix's neighbours, [B, k, prefix_dim]")
            parts.append(self.fusion(self.prefix_proj, prefix, neighbours))  # [B,P,C]
        elif prefix is not None:
            parts.append(self.prefix_proj(prefix.to(self.prefix_proj.weight.dtype)).unsqueeze(1))  # [B,1,C]
        if ids is not None:
            parts.append(self.wte(ids))  # [B,T,C]
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        start = cache.length if cache is not None else 0
        limit = cache.k.size(3) if cache is not None else self.config.block_size
        if start + x.size(1) > limit:
            raise ValueError(f"sequence of {start + x.size(1)} positions exceeds block_size/cache size {limit}")
        pos = torch.arange(start, start + x.size(1), device=x.device)
        x = self.drop(x + self.wpe(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += x.size(1)
        return self.lm_head(self.ln_f(x))

    # ----------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self, prefix: torch.Tensor | np.ndarray, max_len: int = 30, beam: int = 1,
        length_penalty: float = 1.0, use_cache: bool = True, neighbours: torch.Tensor | np.ndarray | None = None,
        prompt: torch.Tensor | np.ndarray | None = None,
    ) -> list[list[int]]:
        """Token ids (without ``<start>``/``<end>``) for each prefix vector [B, prefix_dim].

        ``beam=1``: greedy. ``beam>1``: beam search; finished hypotheses keep their place in the beam, and the
        final choice ranks ``sum(log p) / length**length_penalty`` (1.0: mean log-prob, the default; 0.0: raw
        sum, which favours short captions). Rows stop at ``<end>`` or after ``max_len`` tokens. ``use_cache=False``
        re-runs the whole sequence at every step (greedy only; the reference for tests). A fused decoder needs
        each prefix's ``neighbours`` [B, k, prefix_dim], and one with an entity prompt its ``prompt`` [B, T] (compact
        ids read before ``<start>``)."""
        prefix = torch.as_tensor(prefix, dtype=torch.float32, device=self.device)
        if prefix.ndim != 2 or prefix.size(1) != self.config.prefix_dim:
            raise ValueError(f"prefix must be [B, {self.config.prefix_dim}], got {list(prefix.shape)}")
        if neighbours is not None:
            neighbours = torch.as_tensor(neighbours, dtype=torch.float32, device=self.device)
        positions = self.prefix_len(neighbours.size(1) if neighbours is not None else None)
        if self.config.prompt_tokens:
            if prompt is None or len(prompt) != prefix.size(0):
                raise ValueError(f"this decoder reads an entity prompt of {self.config.prompt_tokens} tokens per "
                                 f"prefix before it writes")
            prompt = torch.as_tensor(prompt, dtype=torch.long, device=self.device)
            positions += prompt.size(1)
        if max_len + 1 + positions > self.config.block_size:
            raise ValueError(f"max_len {max_len} + prefix ({positions}) + <start> exceeds block_size "
                             f"{self.config.block_size}")
        if beam < 1 or beam > self.config.vocab_size:
            raise ValueError(f"beam must be in 1..vocab_size, got {beam}")
        was_training = self.training
        self.eval()
        try:
            if beam == 1:
                return self._greedy(prefix, max_len, use_cache, neighbours, positions, prompt)
            return self._beam_search(prefix, max_len, beam, length_penalty, neighbours, positions, prompt)
        finally:
            self.train(was_training)

    def new_cache(self, batch: int, length: int | None = None) -> KVCache:
        """An empty cache for ``batch`` rows and ``length`` positions (default: block_size)."""
        return KVCache(self.config, batch, length or self.config.block_size, self.device, self.wte.weight.dtype)

    def _trim(self, rows: list[list[int]]) -> list[list[int]]:
        end = self.config.end_id
        return [row[: row.index(end)] if end in row else row for row in rows]

    def _start(self, rows: int, prompt: torch.Tensor | None) -> torch.Tensor:
        """The first input tokens: ``[prompt..., <start>]`` [rows, T+1]."""
        start = torch.full((rows, 1), self.config.start_id, dtype=torch.long, device=self.device)
        return start if prompt is None else torch.cat([prompt, start], dim=1)

    def _greedy(self, prefix: torch.Tensor, max_len: int, use_cache: bool, neighbours: torch.Tensor | None,
                positions: int, prompt: torch.Tensor | None = None) -> list[list[int]]:
        B = prefix.size(0)
        seq = self._start(B, prompt)  # [B, T+1+t]
        given = seq.size(1)
        cache = self.new_cache(B, max_len + 1 + positions) if use_cache else None
        logits = self(prefix, seq, cache, neighbours)[:, -1]  # [B, V]
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        for _ in range(max_len):
            nxt = logits.argmax(-1).masked_fill(done, self.config.end_id)  # [B]
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            done |= nxt == self.config.end_id
            if bool(done.all()) or seq.size(1) - given >= max_len:
                break
            logits = (self(None, nxt[:, None], cache) if use_cache else self(prefix, seq, None, neighbours))[:, -1]
        return self._trim(seq[:, given:].tolist())

    def _beam_search(self, prefix: torch.Tensor, max_len: int, K: int, alpha: float,
                     neighbours: torch.Tensor | None, positions: int, prompt: torch.Tensor | None = None
                     ) -> list[list[int]]:
        B, V, end = prefix.size(0), self.config.vocab_size, self.config.end_id
        cache = self.new_cache(B * K, max_len + 1 + positions)
        start = self._start(B * K, None if prompt is None else prompt.repeat_interleave(K, 0))
        repeated = neighbours.repeat_interleave(K, 0) if neighbours is not None else None
        logp = self(prefix.repeat_interleave(K, 0), start, cache, repeated)[:, -1].float().log_softmax(-1)  # [B*K, V]
        scores = torch.full((B, K), -math.inf, device=self.device)
        scores[:, 0] = 0.0  # all beams start equal: keep one so the first step picks K distinct tokens
        tokens = torch.zeros(B * K, 0, dtype=torch.long, device=self.device)
        done = torch.zeros(B * K, dtype=torch.bool, device=self.device)
        lengths = torch.zeros(B * K, device=self.device)
        rows = torch.arange(B, device=self.device)[:, None] * K
        for _ in range(max_len):
            logp[done] = -math.inf  # a finished beam may only "continue" with <end>, at no cost
            logp[done, end] = 0.0
            top, flat = (scores.reshape(-1, 1) + logp).view(B, K * V).topk(K, dim=1)  # [B, K]
            src = (rows + flat // V).view(-1)  # [B*K] source hypothesis of each new one
            tok = (flat % V).view(-1)
            lengths = lengths[src] + (~done[src]).float()
            tokens = torch.cat([tokens[src], tok[:, None]], dim=1)
            done = done[src] | (tok == end)
            scores = top
            if bool(done.all()) or tokens.size(1) == max_len:
                break
            cache.reorder(src)
            logp = self(None, tok[:, None], cache)[:, -1].float().log_softmax(-1)
        final = scores / lengths.clamp(min=1).view(B, K) ** alpha
        best = (rows.view(-1) + final.argmax(1)).tolist()
        return self._trim(tokens[best].tolist())

    def decode_texts(
        self, prefixes: torch.Tensor | np.ndarray, vocab: Vocab, max_len: int = 30, beam: int = 1,
        batch_size: int = 256, length_penalty: float = 1.0, neighbours: torch.Tensor | np.ndarray | None = None,
        prompt: torch.Tensor | np.ndarray | None = None,
    ) -> list[str]:
        """Clean captions for prefix vectors [N, prefix_dim] (with their ``neighbours`` [N, k, prefix_dim] for a
        fused decoder), generated in batches of ``batch_size``."""
        if len(vocab) != self.config.vocab_size:
            raise ValueError(f"vocabulary has {len(vocab)} ids but the model {self.config.vocab_size}")
        texts: list[str] = []
        with cpu.claim():
            for i in range(0, len(prefixes), batch_size):
                cpu.tick()
                ids = self.generate(prefixes[i : i + batch_size], max_len, beam, length_penalty,
                                    neighbours=None if neighbours is None else neighbours[i : i + batch_size],
                                    prompt=None if prompt is None else prompt[i : i + batch_size])
                texts.extend(vocab.decode(row) for row in ids)
        return texts


def build_decoder(config: DecoderConfig | str | Path, vocab: Vocab | None = None, **overrides: Any) -> DeCapDecoder:
    """A fresh decoder from a config (or bundled name/JSON path), sized to ``vocab`` when given."""
    cfg = config if isinstance(config, DecoderConfig) else load_config(config)
    if vocab is not None:
        overrides = {"vocab_size": len(vocab), "start_id": vocab.start_id, "end_id": vocab.end_id, **overrides}
    return DeCapDecoder(replace(cfg, **overrides))
