"""How a decoder is trained (:class:`TrainRecipe`, saved in every checkpoint's meta) and what a run returns."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any


@dataclass
class TrainRecipe:
    """How to train. The defaults are measured for small corpora (~5-20k sentences) on CPU with decap-small
    (``benchmarks/reconstruction.py``): lr 1e-3, 100 warm-up steps, batch 64 (more steps per minute beat larger
    batches there; lr 3e-4 learns far slower, 2e-3 no better). :meth:`paper` is the paper's COCO recipe (lr 1e-5,
    1,000 warm-up steps, batch 128, 10 epochs), meant for ~500k sentences on a GPU."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01  # on matrices only (not biases, LayerNorms)
    label_smoothing: float = 0.1
    max_tokens: int = 20  # caption ids incl. <start>/<end>, cut like the official code
    val_fraction: float = 0.05
    seed: int = 0
    patience: int | None = 3  # epochs without a better validation loss before stopping; None: never
    max_steps: int | None = None
    noise_std: float = 0.0  # CapDec-style Gaussian noise on the prefix, then re-normalised; 0: off
    #: The same noise given as the expected cosine between a noisy and a clean prefix, whatever the width
    #: (noise_std_for); None: off. CapDec's variance 0.016 at 512-d is a cosine of ~0.33.
    noise_cos: float | None = None
    #: Retrieval-fused decoders (``DecoderConfig.neighbors`` > 0): the noise on a caption's embedding when it
    #: retrieves its neighbours, as the expected cosine to the clean one (None: none), and the cosine above which a
    #: row counts as a copy of the caption and is not retrieved (None: only the caption itself is left out).
    retrieval_noise_cos: float | None = None
    exclude_cos: float | None = None
    #: A fused decoder's entity prompt: tokens at least this many of a caption's neighbours hold (and far more
    #: often than the bank does) are read before <start> (decapflow.decoder.entities); 0: no prompt.
    entity_min_count: int = 0
    grad_clip: float = 1.0
    device: str | None = None  # None: decapflow.config.default_device()
    amp: str = "auto"  # bf16 autocast: "auto" (see use_bf16), "bf16" (always) or "off"
    num_threads: int | None = None  # CPU threads; None: $DECAPFLOW_THREADS, else a fair share (decapflow.cpu)

    @classmethod
    def paper(cls, **overrides: Any) -> TrainRecipe:
        """DeCap's recipe: AdamW lr 1e-5 (no weight decay), 1,000 warm-up steps then linear decay, batch 128,
        10 epochs, label smoothing 0.1, 20 tokens, no noise, no gradient clipping, no early stopping."""
        base = cls(epochs=10, batch_size=128, lr=1e-5, warmup_steps=1000, weight_decay=0.0, patience=None,
                   grad_clip=0.0)
        return replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainRecipe:
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(data) - known):
            raise ValueError(f"unknown recipe keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def __post_init__(self) -> None:
        if self.noise_cos is not None and not 0.0 < self.noise_cos <= 1.0:
            raise ValueError(f"noise_cos is a cosine in (0, 1], not {self.noise_cos}")
        if self.noise_cos is not None and self.noise_std:
            raise ValueError("give the prefix noise as noise_cos or as noise_std, not both")
        for name in ("retrieval_noise_cos", "exclude_cos"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} is a cosine in (0, 1], not {value}")


#: What ``decapflow train --fused`` trains: the architecture (DecoderConfig fields) and the recipe's defaults for
#: it (keys a caller sets win). Chosen on world-gap, confirmed on world-rich (docs/guides/fused.md).
FUSED_CONFIG: dict[str, Any] = {"neighbors": 5, "fusion": "tokens"}
FUSED_RECIPE: dict[str, Any] = {"noise_cos": 0.8, "retrieval_noise_cos": 0.8, "exclude_cos": 0.97}


def fused_settings(fused: bool | dict[str, Any] | None) -> dict[str, Any] | None:
    """The fused architecture for ``fused`` (True: :data:`FUSED_CONFIG`; a dict: those fields over it; falsy:
    None, a plain decoder)."""
    if not fused:
        return None
    settings = {**FUSED_CONFIG, **(fused if isinstance(fused, dict) else {})}
    if unknown := sorted(set(settings) - set(FUSED_CONFIG)):
        raise ValueError(f"unknown fused settings {unknown}; known: {sorted(FUSED_CONFIG)}")
    if int(settings["neighbors"]) < 1:
        raise ValueError(f"a fused decoder reads at least 1 neighbour, not {settings['neighbors']}")
    return settings


def noise_std_for(recipe: TrainRecipe, dim: int) -> float:
    """The per-dimension std of the prefix noise. For ``noise_cos`` c at width d: a unit x plus N(0, s^2 I) has
    norm^2 ~ 1 + d s^2, so cos(x, x + noise) ~ 1 / sqrt(1 + d s^2), and s = sqrt((1/c^2 - 1) / d)."""
    if recipe.noise_cos is None:
        return recipe.noise_std
    return math.sqrt((1.0 / recipe.noise_cos**2 - 1.0) / dim)


@dataclass
class TrainResult:
    out_dir: Path
    best: Path  # checkpoint folder with the lowest validation loss
    last: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    best_val_loss: float = math.inf
    stopped_early: bool = False
    steps: int = 0
