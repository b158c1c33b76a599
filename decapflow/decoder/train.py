"""Text-only training of the DeCap decoder: rebuild each sentence from its own unit CLIP text embedding.

``train_decoder(texts, vectors, config=..., recipe=..., out_dir=...)`` is a plain library function over arrays
(the caller reads them from a memory bank; ``rows`` picks rows without copying them, so a memory-mapped bank
cache is read per batch). Texts are tokenised once (cached by content hash; under torchrun by rank 0 alone),
mapped onto a compact vocabulary, split into train/validation with the recipe's seed, and batched padded to each
batch's longest caption. AdamW, linear warm-up then linear decay to zero, gradient clipping, label-smoothed
cross-entropy on ``w1 ... wn <end>``.

Every epoch writes ``out_dir/metrics.jsonl`` (one JSON object per epoch), ``out_dir/loss.png``, the checkpoint
``out_dir/last/`` (a decoder folder plus ``train_state.pt``: optimizer, step, RNG states, history) and, when the
validation loss improves, ``out_dir/best/``. ``resume=True`` continues from ``last/`` and reproduces the losses
of an uninterrupted run. Under ``torchrun`` (``WORLD_SIZE>1``) it trains with DistributedDataParallel and rank 0
writes the files.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from decapflow import cpu
from decapflow.config import cache_dir, default_device
from decapflow.decoder.checkpoint import load_decoder, replace_dir, write_decoder_files
from decapflow.decoder.distributed import Dist
from decapflow.decoder.entities import PROMPT_TOKENS, document_frequency, prompts, token_sets
from decapflow.decoder.model import DeCapDecoder, DecoderConfig, load_config
from decapflow.decoder.plot import plot_losses
from decapflow.decoder.recipe import TrainRecipe, TrainResult, noise_std_for
from decapflow.decoder.retrieval import self_neighbours
from decapflow.decoder.vocab import Captions, Texts, Vocab, prepare
from decapflow.errors import TrainingDiverged
from decapflow.progress import Pulse


# ------------------------------------------------------------------------------------------- data
def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation indices (at least one validation row). ``val_fraction`` 0 holds nothing out:
    for tiny corpora meant to be memorised; validation metrics are then measured on the training rows."""
    if val_fraction <= 0:
        return np.arange(n), np.arange(n)
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def lr_at(step: int, recipe: TrainRecipe, total_steps: int) -> float:
    """Linear warm-up to ``recipe.lr`` over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    return recipe.lr * max(0.0, (total_steps - step) / max(1, total_steps - recipe.warmup_steps))


def use_bf16(amp: str, device: torch.device, config: DecoderConfig) -> bool:
    """Whether to train under bf16 autocast. ``"auto"``: on CUDA; on CPUs with native bf16 (AVX512-BF16 or
    AMX) for models 256 wide or more. Measured on this AMD EPYC (1 thread, batch 128): decap-base 2.0× and
    decap-small 1.5× the float32 tokens/s with the same validation loss; the 32-wide test model 0.8×."""
    if amp not in ("auto", "bf16", "off"):
        raise ValueError(f"recipe.amp must be 'auto', 'bf16' or 'off', got {amp!r}")
    if amp != "auto":
        return amp == "bf16"
    if device.type == "cuda":
        return True
    native = any(getattr(torch.cpu, name, lambda: False)() for name in
                 ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return device.type == "cpu" and native and config.n_embd >= 256


def make_optimizer(model: torch.nn.Module, recipe: TrainRecipe) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.lr)


def token_loss(model: torch.nn.Module, prefix: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
               label_smoothing: float, neighbours: torch.Tensor | None = None, prefix_len: int = 1
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over real targets, and the logits [B, L-1, V] (the ``prefix_len`` prefix positions
    dropped; a fused decoder gets each caption's ``neighbours`` [B, k, D])."""
    logits = model(prefix, inputs, None, neighbours)[:, prefix_len:]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing)
    return loss, logits


@dataclass
class Neighbours:
    """A fused decoder's neighbours for every training row: ids into ``pool`` (the training rows, unit), nearest
    first, and how long retrieving them took."""

    pool: np.ndarray  # [N, D]
    table: np.ndarray  # [N, k] int32
    seconds: float = 0.0
    prompts: np.ndarray | None = None  # [N, T] compact ids: each row's entity prompt (decapflow.decoder.entities)

    def batch(self, index: np.ndarray) -> torch.Tensor:
        """The neighbours' vectors of rows ``index``: [B, k, D]."""
        return torch.from_numpy(self.pool[self.table[index]])

    def prompt(self, index: np.ndarray) -> np.ndarray | None:
        return None if self.prompts is None else self.prompts[index]


# ------------------------------------------------------------------------------------------- the loop
@dataclass
class _State:
    epoch: int = 0  # next epoch to run
    step: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: DeCapDecoder, data: Captions, index: np.ndarray, recipe: TrainRecipe,
             device: torch.device, autocast: Any, retrieved: Neighbours | None = None) -> tuple[float, float]:
    """Validation loss (same objective as training) and token accuracy, over ``index`` (a fused decoder's
    neighbours from ``retrieved``)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(0, len(index), 512):
        rows = index[i : i + 512]
        prompt = retrieved.prompt(rows) if retrieved is not None else None
        prefix, inputs, targets = (t.to(device) for t in data.batch(rows, prompt))
        near = retrieved.batch(rows).to(device) if retrieved is not None else None
        with autocast():
            loss, logits = token_loss(model, prefix, inputs, targets, recipe.label_smoothing, near,
                                      model.prefix_len())
        real = targets != -100
        n = int(real.sum())
        loss_sum += float(loss) * n
        correct += int(((logits.argmax(-1) == targets) & real).sum())
        count += n
    model.train(was_training)
    return loss_sum / max(count, 1), correct / max(count, 1)


class _Trainer:
    """One training run's moving parts; ``train_decoder`` is the entry point."""

    def __init__(self, model: DeCapDecoder, vocab: Vocab, data: Captions, recipe: TrainRecipe,
                 out_dir: Path, device: torch.device, dist: Dist, meta: dict[str, Any], pulse: Pulse | None = None
                 ) -> None:
        self.model, self.vocab, self.data, self.recipe = model, vocab, data, recipe
        self.out_dir, self.device, self.dist, self.meta = out_dir, device, dist, meta
        self.pulse = pulse if dist.main else None
        self.began, self.began_step = time.monotonic(), 0  # for the ETA: this process's start (a resume too)
        self.train_idx, self.val_idx = split(len(data), recipe.val_fraction, recipe.seed)
        self.optimizer = make_optimizer(model, recipe)
        self.net: torch.nn.Module = model
        if dist.world > 1:
            ids = [dist.local_rank] if device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.steps_per_epoch = math.ceil(math.ceil(len(self.train_idx) / dist.world) / recipe.batch_size)
        total = recipe.epochs * self.steps_per_epoch
        self.total_steps = min(total, recipe.max_steps) if recipe.max_steps is not None else total
        amp = use_bf16(recipe.amp, device, model.config)
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else nullcontext
        self.state = _State()
        self.plotted = -math.inf
        self.noise_std = noise_std_for(recipe, data.vectors.shape[1])  # training only: evaluate() adds none
        #: A fused decoder's neighbour tables: clean ones for validation, noisy ones per epoch for training.
        self.pool = data.unit_rows() if model.fused else None
        self.token_sets = self.token_df = None
        if model.config.prompt_tokens:  # each row's distinct tokens, and how common each token is in the bank
            self.token_sets = token_sets(data.flat, data.offsets, np.arange(len(data)), vocab.to_compact)
            self.token_df = document_frequency(self.token_sets, len(vocab))
            with torch.no_grad():
                model.token_df.copy_(torch.from_numpy(self.token_df))
        self.val_neighbours = self.neighbours(None) if model.fused else None

    # -- checkpoints ------------------------------------------------------------------------------------
    def save(self, improved: bool) -> None:
        meta = {**self.meta, "recipe": self.recipe.to_dict(), "metrics": self.state.history[-1],
                "best_epoch": self.state.best_epoch, "train_texts": len(self.train_idx)}
        tmp = self.out_dir / ".last.tmp"
        write_decoder_files(tmp, self.model, self.vocab, meta)
        torch.save({
            "state": asdict(self.state), "optimizer": self.optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
        }, tmp / "train_state.pt")
        replace_dir(tmp, self.out_dir / "last")
        if improved:
            write_decoder_files(self.out_dir / ".best.tmp", self.model, self.vocab, meta)
            replace_dir(self.out_dir / ".best.tmp", self.out_dir / "best")

    def restore(self, folder: Path) -> None:
        model, vocab, meta = load_decoder(folder)
        same = meta.get("texts_key") == self.meta.get("texts_key") and vocab.clip_ids == self.vocab.clip_ids
        if not same or model.config != self.model.config:
            raise ValueError(f"cannot resume from {folder}: it was trained on other texts or another config")
        self.model.load_state_dict(model.state_dict())
        saved = torch.load(folder / "train_state.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng_cpu"])
        if saved["rng_cuda"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(saved["rng_cuda"])
        self.state = _State(**saved["state"])

    def neighbours(self, epoch: int | None) -> Neighbours:
        """Every training row's neighbours among the training rows (itself and its near-copies left out): for
        ``epoch``, retrieved with the recipe's retrieval noise (seeded by epoch); None: without noise."""
        r = self.recipe
        start = time.perf_counter()
        table = self_neighbours(self.pool, self.model.config.neighbors, exclude_cos=r.exclude_cos,
                                noise_cos=None if epoch is None else r.retrieval_noise_cos,
                                seed=r.seed * 100_003 + (epoch if epoch is not None else -1), device=self.device)
        prompt = None
        if self.token_sets is not None:
            prompt = prompts([[self.token_sets[j] for j in row] for row in table], self.token_df,
                             self.model.config.prompt_min_count, self.vocab.end_id)
        return Neighbours(self.pool, table, time.perf_counter() - start, prompt)

    # -- epochs -----------------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's shuffled training rows for ``epoch`` (a pure function of seed and epoch)."""
        sampler = DistributedSampler(range(len(self.train_idx)), num_replicas=self.dist.world,
                                     rank=self.dist.rank, shuffle=True, seed=self.recipe.seed)
        sampler.set_epoch(epoch)
        return self.train_idx[np.fromiter(iter(sampler), dtype=np.int64)]

    def train_epoch(self, epoch: int, progress: bool) -> tuple[float, int, float]:
        """One pass; returns (summed token loss, target tokens, seconds)."""
        r, state = self.recipe, self.state
        order = self.epoch_order(epoch)
        noise = torch.Generator().manual_seed(r.seed * 100_003 + epoch)
        retrieved = self.neighbours(epoch) if self.model.fused else None
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{r.epochs}", unit="batch",
                   disable=not (progress and self.dist.main), dynamic_ncols=True, leave=False)
        self.net.train()
        loss_sum, tokens, start = torch.zeros((), device=self.device), 0, time.perf_counter()
        for b in range(self.steps_per_epoch):
            if state.step >= self.total_steps:
                break
            cpu.tick()
            index = order[b * r.batch_size : (b + 1) * r.batch_size]
            prefix, inputs, targets = self.data.batch(index, retrieved.prompt(index) if retrieved is not None else None)
            if self.noise_std > 0:
                prefix = F.normalize(prefix + self.noise_std * torch.randn(prefix.shape, generator=noise), dim=-1)
            near = retrieved.batch(index).to(self.device, non_blocking=True) if retrieved is not None else None
            n = int((targets != -100).sum())
            prefix, inputs, targets = (t.to(self.device, non_blocking=True) for t in (prefix, inputs, targets))
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(state.step, r, self.total_steps)
            with self.autocast():
                loss, _ = token_loss(self.net, prefix, inputs, targets, r.label_smoothing, near,
                                     self.model.prefix_len())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if r.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.grad_clip)
            self.optimizer.step()
            state.step += 1
            loss_sum += loss.detach() * n
            tokens += n
            bar.update()
            if b % 20 == 0:
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):,.0f}")
            if self.pulse is not None and self.pulse.due(state.step):
                self.report_step(epoch, float(loss_sum) / max(tokens, 1), tokens / (time.perf_counter() - start))
        bar.close()
        return float(loss_sum), tokens, time.perf_counter() - start

    def report_step(self, epoch: int, loss: float, tokens_per_s: float) -> None:
        if not math.isfinite(loss):
            raise TrainingDiverged(f"the training loss is {loss} at step {self.state.step} (lr {self.recipe.lr})")
        self.pulse.step(self.state.step, self.total_steps,
                        f"epoch {epoch + 1}/{self.recipe.epochs} · loss {loss:.4f} · {tokens_per_s:,.0f} tokens/s",
                        since=self.began, done_since=self.began_step)

    def report_validation(self, metrics: dict[str, Any], improved: bool) -> None:
        m, total = metrics, self.total_steps
        if not (math.isfinite(m["train_loss"]) and math.isfinite(m["val_loss"])):
            raise TrainingDiverged(f"epoch {m['epoch']}: train loss {m['train_loss']}, validation loss "
                                   f"{m['val_loss']} (lr {self.recipe.lr})")
        if self.pulse is not None:
            best = "best so far" if improved else f"best {self.state.best_val_loss:.4f} at epoch {self.state.best_epoch}"
            self.pulse.say(f"validation after epoch {m['epoch']}/{self.recipe.epochs} (step {m['step']:,}/{total:,}): "
                           f"train loss {m['train_loss']:.4f}, validation loss {m['val_loss']:.4f} ({best}), "
                           f"token accuracy {m['val_acc']:.3f}, {m['tokens_per_s']:,.0f} tokens/s",
                           m["step"] / max(total, 1))

    def finished(self) -> bool:
        """Stopped early, or out of epochs or steps (a resume with a larger budget continues)."""
        s = self.state
        return s.stopped_early or s.epoch >= self.recipe.epochs or s.step >= self.total_steps

    def run(self, progress: bool, on_epoch: Callable[[dict[str, Any]], Any] | None) -> None:
        r, state = self.recipe, self.state
        self.began, self.began_step = time.monotonic(), state.step
        if self.pulse is not None:
            held = (f"{len(self.val_idx):,} held out for validation" if r.val_fraction > 0 else
                    "validated on the training rows")
            self.pulse.say(f"training on {len(self.train_idx):,} sentences ({held}): {self.total_steps:,} steps of "
                           f"{r.batch_size} on {self.device}"
                           + (f", from step {state.step:,}" if state.step else ""), state.step / max(self.total_steps, 1))
        while not self.finished():
            loss_sum, tokens, seconds = self.train_epoch(state.epoch, progress)
            loss_sum, tokens, seconds = self.dist.sum(loss_sum, tokens, seconds)
            val_loss, val_acc = evaluate(self.model, self.data, self.val_idx, r, self.device, self.autocast,
                                         self.val_neighbours)
            metrics = {
                "epoch": state.epoch + 1, "step": state.step, "train_loss": loss_sum / max(tokens, 1),
                "val_loss": val_loss, "val_acc": val_acc,
                "tokens_per_s": tokens / max(seconds / self.dist.world, 1e-9),
                "lr": lr_at(max(state.step - 1, 0), r, self.total_steps), "seconds": seconds / self.dist.world,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            improved = state.best_epoch < 0 or val_loss < state.best_val_loss
            if improved:
                state.best_val_loss, state.best_epoch, state.bad_epochs = val_loss, state.epoch + 1, 0
            else:
                state.bad_epochs += 1
            state.stopped_early = r.patience is not None and state.bad_epochs >= r.patience
            state.epoch += 1
            state.history.append(metrics)
            self.report_validation(metrics, improved)
            if self.dist.main:
                with open(self.out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                if self.finished() or time.monotonic() - self.plotted >= 30:  # a plot costs ~0.2 s
                    plot_losses(state.history, self.out_dir / "loss.png")
                    self.plotted = time.monotonic()
                self.save(improved)
                if on_epoch is not None:
                    on_epoch(metrics)
            self.dist.barrier()


def train_decoder(
    texts: Texts, vectors: np.ndarray, *, config: DecoderConfig | str | Path,
    recipe: TrainRecipe | None = None, out_dir: Path, resume: bool = False, progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], Any] | None = None, meta: dict[str, Any] | None = None,
    token_cache: Path | bool = True, rows: np.ndarray | None = None, pulse: Pulse | None = None,
) -> TrainResult:
    """Train a decoder on ``texts`` and their unit CLIP vectors [N, D]; checkpoints go to ``out_dir``.
    ``rows``: the indices of the rows to train on (default all); ``vectors`` may be a read-only memmap, which
    stays one (each batch gathers and normalises its rows), shared by torchrun ranks through the page cache.

    ``config`` is a DecoderConfig or a bundled name/JSON path (prefix size and vocabulary are filled in).
    ``meta`` (bank, bank version, encoder spec, ...) is stored in every checkpoint's ``meta.json``.
    ``on_epoch(metrics)`` is called after each epoch on rank 0; ``pulse`` gets progress lines (step, loss,
    tokens/s, ETA at its rhythm, and each validation). A NaN or infinite loss raises :class:`TrainingDiverged`.
    ``token_cache``: a folder, True for
    ``<home>/cache/tokens``, False for none. The caller's global torch RNG is left untouched."""
    recipe = recipe or TrainRecipe()
    dist = Dist.from_env()
    device = dist.setup(default_device(recipe.device))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = cache_dir() / "tokens" if token_cache is True else (token_cache or None)
    data, vocab = prepare(texts, vectors, recipe.max_tokens, cache, rows=rows, dist=dist)
    cfg = config if isinstance(config, DecoderConfig) else load_config(config)
    cfg = replace(cfg, prefix_dim=data.vectors.shape[1], vocab_size=len(vocab),
                  start_id=vocab.start_id, end_id=vocab.end_id)
    if recipe.entity_min_count and not cfg.neighbors:
        raise ValueError("an entity prompt comes from a caption's neighbours: it needs a fused decoder (neighbors > 0)")
    if recipe.entity_min_count:
        cfg = replace(cfg, prompt_tokens=PROMPT_TOKENS, prompt_min_count=recipe.entity_min_count)
    if cfg.neighbors:  # room for the fused prefix, the prompt and a 30-token caption after them (generation's default)
        prefix = (1 + cfg.neighbors if cfg.fusion == "tokens" else 1) + cfg.prompt_tokens
        cfg = replace(cfg, block_size=max(cfg.block_size, prefix + 1 + 30))
    if cfg.block_size < recipe.max_tokens:
        raise ValueError(f"block_size {cfg.block_size} < max_tokens {recipe.max_tokens} (prefix + inputs)")
    with cpu.claim(recipe.num_threads):  # a fair share of the machine's CPUs, re-read each step (tick)
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(recipe.seed)
            meta = {**(meta or {}), "texts_key": data.key}
            trainer = _Trainer(DeCapDecoder(cfg).to(device), vocab, data, recipe, out_dir, device, dist, meta,
                               pulse)
            if resume and (out_dir / "last" / "train_state.pt").is_file():
                trainer.restore(out_dir / "last")
            if dist.main:  # metrics.jsonl mirrors the (restored) history
                lines = "".join(json.dumps(h) + "\n" for h in trainer.state.history)
                (out_dir / "metrics.jsonl").write_text(lines)
            trainer.run(progress, on_epoch)
    s = trainer.state
    return TrainResult(out_dir, out_dir / "best", out_dir / "last", s.history, s.best_epoch, s.best_val_loss,
                       s.stopped_early, s.step)
