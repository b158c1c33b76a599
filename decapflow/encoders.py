"""The frozen CLIP encoder: parse an encoder spec, load it once, embed text and images as unit vectors.

An *encoder spec* names any open_clip model:

- ``ViT-B-32:openai`` (the default: the paper's CLIP) or any ``NAME:PRETRAINED`` pair open_clip knows
  (``open_clip.list_pretrained()``); weights are downloaded by open_clip when online, then cached;
- ``hf-hub:org/repo`` for models on the Hugging Face hub;
- ``path/to/MODEL.json:path/to/weights.safetensors`` for a local model: an open_clip model-config JSON (the
  model's name is the JSON's stem) and a local weights file (``.safetensors``, or a ``.pt``/``.bin`` loaded with
  ``weights_only=True``). This works offline;
- ``NAME:random`` or ``MODEL.json:random``: the architecture with deterministic random weights (seed 0), for
  tests and speed benchmarks only;
- ``world``: the tiny CLIP trained on decapflow's synthetic world (shipped in ``corpora/world``); its modality gap
  is 0.08, far below real CLIP's;
- ``world-gap``: the same architecture trained to have real CLIP's modality gap (0.83 between the image and text
  means: a narrow cone per tower at initialisation, kept by a low fixed temperature; ``corpora/world/REPORT.md``).
  The demo uses it.

Text is embedded in length-bucketed batches trimmed to their longest sentence: CLIP's text attention is causal and
the embedding is read at the end token, so the padding after it cannot change the result, and captions use
~10-20 of the 77 positions.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from decapflow import cpu
from decapflow.config import default_device
from decapflow.errors import EncoderUnavailable  # noqa: F401  (raised here; importable from here)

DEFAULT_ENCODER = "ViT-B-32:openai"
WORLD_DIR = Path(__file__).resolve().parent.parent / "corpora" / "world"
BUILTIN_SPECS = {
    "world": f"{WORLD_DIR / 'world-clip.json'}:{WORLD_DIR / 'world-clip.safetensors'}",
    "world-gap": f"{WORLD_DIR / 'world-clip-gap.json'}:{WORLD_DIR / 'world-clip-gap.safetensors'}",
}


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed encoder spec. ``model`` is an open_clip model name (or ``hf-hub:...``); ``pretrained`` a tag, a
    local weights path, or None for random weights; ``config`` the model-config JSON of a local model."""

    raw: str
    model: str
    pretrained: str | None
    config: Path | None = None


def parse_spec(spec: str) -> EncoderSpec:
    """Parse an encoder spec string (see the module docstring). Raises EncoderUnavailable on a malformed one."""
    raw = spec.strip()
    resolved = BUILTIN_SPECS.get(raw, raw)
    if resolved.startswith("hf-hub:"):
        return EncoderSpec(raw, resolved, None)
    if resolved.endswith(".json") or ".json:" in resolved:
        config_part, _, weights = resolved.rpartition(".json:") if ".json:" in resolved else (resolved[:-5], "", "")
        config = Path(config_part + ".json").expanduser()
        pretrained = None if weights in ("", "random") else str(Path(weights).expanduser())
        if weights == "":
            raise EncoderUnavailable(
                f"encoder spec {raw!r} names a model config but no weights: write CONFIG.json:WEIGHTS "
                f"(a .safetensors/.pt file) or CONFIG.json:random for untrained weights"
            )
        return EncoderSpec(raw, config.stem, pretrained, config)
    name, sep, tag = resolved.partition(":")
    if not sep or not name or not tag:
        raise EncoderUnavailable(
            f"encoder spec {raw!r} is not NAME:PRETRAINED (e.g. {DEFAULT_ENCODER}), hf-hub:ORG/REPO, "
            f"CONFIG.json:WEIGHTS or 'world'"
        )
    return EncoderSpec(raw, name, None if tag == "random" else tag)


def _offline_hint(spec: EncoderSpec) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return (
        f"could not load encoder {spec.raw!r}"
        + (" (HF_HUB_OFFLINE=1 is set)" if offline else "")
        + ". If this machine is offline, download the weights elsewhere and point at them: "
        "--encoder path/to/MODEL.json:path/to/weights.safetensors (open_clip's model configs live in "
        "open_clip/model_configs/), or use the built-in offline encoder 'world'."
    )


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs download failures and 'randomly initialised' warnings at the root logger; we report our own."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)


class Encoder:
    """A loaded, frozen open_clip model with batched, unit-normalised ``encode_text`` / ``encode_image``."""

    def __init__(self, spec: str, device: str | None = None) -> None:
        import open_clip

        self.spec = parse_spec(spec)
        self.device = torch.device(default_device(device))
        if self.spec.config is not None:
            if not self.spec.config.is_file():
                raise EncoderUnavailable(f"encoder config {str(self.spec.config)!r} does not exist")
            open_clip.add_model_config(self.spec.config)
        if self.spec.pretrained and self.spec.config is not None and not Path(self.spec.pretrained).is_file():
            raise EncoderUnavailable(f"encoder weights {self.spec.pretrained!r} do not exist")
        if not self.spec.model.startswith("hf-hub:") and self.spec.model not in open_clip.list_models():
            raise EncoderUnavailable(
                f"unknown open_clip model {self.spec.model!r} in encoder spec {self.spec.raw!r}; "
                f"see open_clip.list_models()"
            )
        torch.manual_seed(0)  # deterministic weights for ':random' specs
        try:
            with _quiet_open_clip():
                model, _, preprocess = open_clip.create_model_and_transforms(
                    self.spec.model, pretrained=self.spec.pretrained, device=self.device
                )
        except Exception as exc:  # open_clip raises RuntimeError/OSError/HF errors for missing weights
            raise EncoderUnavailable(_offline_hint(self.spec) + f" ({type(exc).__name__}: {exc})"[:600]) from exc
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(self.spec.model)
        self.context_length: int = int(getattr(self.tokenizer, "context_length", None) or 77)
        with torch.no_grad():
            probe = self.tokenizer(["a"]).to(self.device)
            self.dim: int = int(self.model.encode_text(probe).shape[-1])
        # Trimming padding is exact only for a causal text tower pooled at the end token (standard CLIP).
        self._trimmable = getattr(self.model, "attn_mask", None) is not None and getattr(
            self.model, "text_pool_type", None
        ) in ("argmax", "eos")
        self._simple_bpe = isinstance(self.tokenizer, open_clip.tokenizer.SimpleTokenizer) and (
            self.tokenizer.reduction_fn is None
        )

    # ---------------------------------------------------------------- text
    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
        """Token ids per text (with start/end, cut to the context) and how many texts were truncated."""
        if self._simple_bpe:
            tok = self.tokenizer
            ids, truncated = [], 0
            for text in texts:
                row = [tok.sot_token_id, *tok.encode(text), tok.eot_token_id]
                if len(row) > self.context_length:
                    truncated += 1
                    row = row[: self.context_length]
                    row[-1] = tok.eot_token_id
                ids.append(row)
            return ids, truncated
        full = self.tokenizer(list(texts))  # [n, ctx], zero padded (other tokenizers)
        ids = [row[: int(np.flatnonzero(row).max()) + 1].tolist() if row.any() else [] for row in full.numpy()]
        truncated = sum(int(row[-1] != 0) for row in full.numpy())  # fills the whole context: likely cut
        return ids, truncated

    def encode_tokens(self, ids: Sequence[list[int]], batch_size: int = 256) -> np.ndarray:
        """Embed pre-tokenised texts: [n] id lists -> [n, dim] float32 unit vectors, in the input order.

        Rows are sorted by length and each batch is padded only to its longest row (when the model allows it)."""
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        lengths = np.array([len(row) for row in ids])
        order = np.argsort(-lengths, kind="stable") if self._trimmable else np.arange(len(ids))
        with cpu.claim():
            for start in range(0, len(ids), batch_size):
                cpu.tick()
                rows = order[start : start + batch_size]
                width = int(lengths[rows].max()) if self._trimmable else self.context_length
                tokens = torch.zeros((len(rows), width), dtype=torch.long)
                for i, r in enumerate(rows):
                    tokens[i, : lengths[r]] = torch.tensor(ids[r])
                out[rows] = self._embed_text_batch(tokens.to(self.device))
        return out

    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """[n] strings -> [n, dim] float32 unit vectors (texts longer than the context are truncated)."""
        ids, _ = self.tokenize(texts)
        return self.encode_tokens(ids, batch_size)

    @torch.no_grad()
    def _embed_text_batch(self, tokens: torch.Tensor) -> np.ndarray:
        with self._autocast():
            if self._trimmable and tokens.shape[1] < self.context_length:
                x = self._encode_trimmed(tokens)
            else:
                x = self.model.encode_text(tokens)
        return F.normalize(x.float(), dim=-1).cpu().numpy()

    def _encode_trimmed(self, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's CLIP.encode_text for a [B, L] batch with L < context: positions and causal mask cut to L."""
        from open_clip.transformer import text_global_pool

        m = self.model
        width = tokens.shape[1]
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast_dtype) + m.positional_embedding[:width].to(cast_dtype)
        x = m.transformer(x, attn_mask=m.attn_mask[:width, :width])
        x = m.ln_final(x)
        x = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection
        return x

    # ---------------------------------------------------------------- images
    @torch.no_grad()
    def encode_image(self, images: Sequence, batch_size: int = 64) -> np.ndarray:
        """[n] PIL images (or already preprocessed [3,H,W] tensors) -> [n, dim] float32 unit vectors."""
        out = np.empty((len(images), self.dim), dtype=np.float32)
        with cpu.claim():
            for start in range(0, len(images), batch_size):
                cpu.tick()
                chunk = images[start : start + batch_size]
                pixels = torch.stack([im if isinstance(im, torch.Tensor) else self.preprocess(im) for im in chunk])
                with self._autocast():
                    x = self.model.encode_image(pixels.to(self.device))
                out[start : start + len(chunk)] = F.normalize(x.float(), dim=-1).cpu().numpy()
        return out

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        return contextlib.nullcontext()


@lru_cache(maxsize=4)
def _load_cached(spec: str, device: str) -> Encoder:
    return Encoder(spec, device)


def load_encoder(spec: str = DEFAULT_ENCODER, device: str | None = None) -> Encoder:
    """The encoder for ``spec`` on ``device``, loaded once per process."""
    return _load_cached(spec.strip(), default_device(device))
