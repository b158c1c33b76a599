"""Train the tiny CLIP of the synthetic world, offline, on one CPU core, and write ``corpora/world/``.

    python -m corpora.train_world_clip --out corpora/world

The model is a plain open_clip CLIP built from a model-config JSON (``world-clip.json``, registered with
``open_clip.add_model_config``): a tiny ModifiedResNet on 64x64 images and a small causal text transformer over the
standard CLIP BPE vocabulary (49,408 tokens, so ``open_clip.get_tokenizer("world-clip")`` works offline).
Training pairs are rendered on the fly from split ``CLIP_TRAIN_SEED``: batch ``b`` holds items
``b*B .. b*B+B-1``, each a scene and one random caption. The loss is CLIP's symmetric contrastive loss, except
that two pairs with the same scene attributes (``Scene.key()``) count as positives of each other rather than
as negatives (the world is small enough for such repeats to occur within a batch).

After training the script measures retrieval on held-out pairs (split ``HELDOUT_SEED``), writes the text corpus
(split ``CORPUS_SEED``), the weights (float16 safetensors), ``REPORT.md`` (this model's section, and a table of
every model in the folder side by side) and ``README.md``.

A world CLIP with real CLIP's modality gap (``world-clip-gap``, 0.83 between the mean unit image and text
embeddings, where the default recipe ends at 0.08)::

    python -m corpora.train_world_clip --out corpora/world --name world-clip-gap --fixed-logit-scale 300 --cone-init 4,2

Both causes are those of real CLIP (Liang et al. 2022, "Mind the Gap"): each tower starts by mapping every input
into a narrow cone of its own (``--cone-init``: the towers' last biases drawn large; the untrained towers already
sit 1.19 apart, and 1.46 with the wide biases), and a low temperature that is not learnt keeps them apart while
contrastive training makes them discriminative. Measured on 200-300 held-out pairs while training (1,200 steps):
with the learnt temperature the gap closes to 0.08; with the scale fixed at 100 it falls to 0.62 by step 200
(0.78 with ``--cone-init 2,0.27``, 0.83 with ``4,1``), and to 0.55 by step 600 even with ``--cone-init 4,2``: the
towers loosen their cones, which raises the effective temperature. Fixed at 300 with ``--cone-init 4,2`` it ends
at 0.83 with held-out top-1 0.97. Scale 100 with ``--label-smoothing 0.1`` keeps it too (0.93, top-1 0.985), but
its unmatched pairs sit at cosine 0.46 against 0.54 for matched ones, far from real CLIP's spread.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from corpora import world
from corpora.world_clip_report import write_readme, write_report

MODEL_NAME = "world-clip"


def model_config() -> dict:
    """The open_clip model config of the world CLIP (written to ``world-clip.json``)."""
    return {
        "embed_dim": 128,
        # open_clip's ModifiedResNet (conv stem, 4 bottleneck stages, attention pooling): at this size it learns
        # shapes and counts far faster on a CPU than a ViT (measured: held-out top-1 0.99 vs 0.66 for a 3-layer,
        # 96-wide, patch-8 ViT trained for the same wall time).
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16, "patch_size": None},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


def build_model(config_path: Path, seed: int) -> tuple[torch.nn.Module, object]:
    """Register the config JSON with open_clip and build the model with seeded random weights."""
    import open_clip

    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(config_path.stem)
    return model, open_clip.get_tokenizer(config_path.stem)


def cone_init(model: torch.nn.Module, text_std: float, image_std: float, seed: int) -> None:
    """The cone effect of initialisation, made strong: each tower's last bias (the text tower's final LayerNorm,
    the image tower's attention-pool output projection) is drawn from N(0, std^2) instead of zeros / PyTorch's
    small uniform init, so each tower starts by mapping every input into a narrow cone around its own random
    direction (Liang et al. 2022, "Mind the Gap"). The biases are then trained like any other (no weight decay)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for bias, std in ((model.ln_final.bias, text_std), (model.visual.attnpool.c_proj.bias, image_std)):
            bias.copy_(std * torch.randn(bias.shape, generator=g))


def to_pixels(images: list, model: torch.nn.Module) -> torch.Tensor:
    """[n] 64x64 PIL images -> [n, 3, 64, 64] normalised floats, exactly what open_clip's preprocess gives for
    images already at the model's size (resize and centre crop are then identities)."""
    cfg = model.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images]))  # [n, H, W, 3]
    return (x.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def batches(model: torch.nn.Module, tokenizer, batch_size: int, steps: int) -> Iterator[tuple]:
    """Yield (pixels [B,3,64,64], tokens [B,ctx], same-key mask [B,B]) for steps 0..steps-1, reproducibly."""
    for step in range(steps):
        scenes, texts = [], []
        for j in range(batch_size):
            rng = random.Random(world.scene_seed(world.CLIP_TRAIN_SEED, step * batch_size + j))
            scene = world.sample_scene(rng)
            scenes.append(scene)
            texts.append(world.caption(scene, rng))
        keys = [s.key() for s in scenes]
        same = torch.tensor([[a == b for b in keys] for a in keys], dtype=torch.float32)
        yield to_pixels([world.render(s) for s in scenes], model), tokenizer(texts), same


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, same: torch.Tensor,
                     smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE over unit vectors [B, D] with soft targets: row i is uniform over pairs sharing i's key,
    mixed with ``smoothing`` of a uniform row (label smoothing: the loss then wants a finite margin, not ever more)."""
    logits = scale * image @ text.T  # [B, B]
    targets = same / same.sum(dim=1, keepdim=True)
    if smoothing:
        targets = (1 - smoothing) * targets + smoothing / len(targets)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on gains, biases, embeddings and the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("class_embedding")
        (no_decay if plain else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def train(model: torch.nn.Module, tokenizer, steps: int, batch_size: int, lr: float, log_every: int = 50,
          fixed_logit_scale: float | None = None, watch_every: int = 0, smoothing: float = 0.0) -> list:
    """Train in place: linear warm-up (5% of steps) then cosine decay. Returns [(step, loss, seconds)].

    The logit scale is learnt (open_clip's init 1/0.07, clamped at 100) unless ``fixed_logit_scale`` fixes it
    (stored in the model, not trained): a low fixed temperature keeps the modality gap of initialisation.
    ``watch_every``: print the gap and image->text top-1 on 200 held-out pairs every that many steps."""
    if fixed_logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(fixed_logit_scale))
        model.logit_scale.requires_grad_(False)
    opt = make_optimizer(model, lr, weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
    )
    model.train()
    log, start, running = [], time.time(), 0.0
    for step, (pixels, tokens, same) in enumerate(batches(model, tokenizer, batch_size, steps)):
        image = F.normalize(model.encode_image(pixels), dim=-1)
        text = F.normalize(model.encode_text(tokens), dim=-1)
        loss = contrastive_loss(image, text, model.logit_scale.exp(), same, smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if fixed_logit_scale is None:
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            log.append((step + 1, running / n, time.time() - start))
            print(f"step {step + 1}/{steps} loss {running / n:.3f} {time.time() - start:.0f}s", flush=True)
            running = 0.0
        if watch_every and (step + 1) % watch_every == 0:
            model.eval()
            watched = evaluate(model, tokenizer, 200, corpus=None)
            model.train()
            print(f"  held-out: gap {watched['gap']:.3f}, i2t top-1 {watched['i2t_top1']:.3f}, matched cosine "
                  f"{watched['pair_cos']:.3f}, unmatched {watched['nonpair_cos']:.3f}", flush=True)
    model.eval()
    return log


@torch.no_grad()
def embed(model: torch.nn.Module, tokenizer, images: list | None = None, texts: list | None = None) -> np.ndarray:
    """Unit embeddings of images or texts, [n, D] float32, in batches of 500."""
    chunks = []
    items = images if images is not None else texts
    for i in range(0, len(items), 500):
        part = items[i : i + 500]
        x = model.encode_image(to_pixels(part, model)) if images is not None else model.encode_text(tokenizer(part))
        chunks.append(F.normalize(x.float(), dim=-1).numpy())
    return np.concatenate(chunks)


def evaluate(model: torch.nn.Module, tokenizer, n: int, corpus: list[str] | None, tau: float = 0.01) -> dict:
    """Held-out quality on ``n`` pairs of split HELDOUT_SEED (image, its first caption).

    - ``i2t_top1`` / ``i2t_top5``: share of images whose top-1 / top-5 captions (among the n) include one of a
      scene with the same attributes (``Scene.key()``); ``t2i_top1`` the other direction; chance is ~1/n.
    - ``i2t_attr``: mean ``attribute_accuracy`` (all keys) of each image's top-1 caption among the n.
    - ``corpus_nn`` / ``corpus_proj``: the same for the nearest *corpus* sentence to the image embedding, and to
      its DeCap projection onto the corpus embeddings (normalize(softmax(M v / tau)^T M)).
    - ``gap``: ||mean(unit image emb) - mean(unit text emb)||; ``pair_cos``: mean cosine of matched pairs;
      ``nonpair_cos``: mean cosine of image i with caption j != i."""
    items = world.make_split(n, world.HELDOUT_SEED, n_captions=1)
    scenes = [s for s, _ in items]
    img = embed(model, tokenizer, images=[world.render(s) for s in scenes])  # [n, D]
    txt = embed(model, tokenizer, texts=[c[0] for _, c in items])  # [n, D]
    sim = img @ txt.T  # [n, n]
    keys = [s.key() for s in scenes]
    rank = np.argsort(-sim, axis=1)
    same = lambda i, j: keys[i] == keys[j]  # noqa: E731
    out = {
        "n": n,
        "i2t_top1": float(np.mean([same(i, rank[i, 0]) for i in range(n)])),
        "i2t_top5": float(np.mean([any(same(i, j) for j in rank[i, :5]) for i in range(n)])),
        "t2i_top1": float(np.mean([same(j, int(np.argmax(sim[:, j]))) for j in range(n)])),
        "i2t_attr": _mean_scores([world.attribute_accuracy(items[rank[i, 0]][1][0], scenes[i]) for i in range(n)]),
        "gap": float(np.linalg.norm(img.mean(0) - txt.mean(0))),
        "pair_cos": float(np.mean(np.diag(sim))),
        "nonpair_cos": float((sim.sum() - np.trace(sim)) / (n * n - n)),
    }
    if corpus is None:  # retrieval only
        return out
    bank = embed(model, tokenizer, texts=corpus)  # [m, D]
    weights = np.exp((img @ bank.T - (img @ bank.T).max(1, keepdims=True)) / tau)  # [n, m]
    proj = (weights / weights.sum(1, keepdims=True)) @ bank
    proj /= np.linalg.norm(proj, axis=1, keepdims=True)
    for name, queries in (("corpus_nn", img), ("corpus_proj", proj)):
        best = np.argmax(queries @ bank.T, axis=1)
        out[name] = _mean_scores([world.attribute_accuracy(corpus[b], s) for b, s in zip(best, scenes, strict=True)])
    return out


def _mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """float16 safetensors (half the bytes; open_clip loads them into the float32 model)."""
    from safetensors.torch import save_file

    state = {k: _half(v.detach()).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))


def _half(t: torch.Tensor) -> torch.Tensor:
    """float16 for floating tensors; integer buffers (BatchNorm's ``num_batches_tracked``) stay as they are."""
    return t.to(torch.float16) if t.is_floating_point() else t


def check_loads(config_path: Path, weights: Path, model: torch.nn.Module, tokenizer) -> float:
    """Reload through open_clip's public factory; return the max |difference| of text embeddings vs ``model``."""
    import open_clip

    reloaded, _, _ = open_clip.create_model_and_transforms(config_path.stem, pretrained=str(weights))
    probe = ["two small red circles and a large blue square", "a photo of three big white triangles"]
    a = embed(model, tokenizer, texts=probe)
    b = embed(reloaded.eval(), tokenizer, texts=probe)
    return float(np.abs(a - b).max())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "world", help="output folder")
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    p.add_argument("--eval-n", type=int, default=1000, help="held-out pairs for the report")
    p.add_argument("--corpus-scenes", type=int, default=24000, help="scenes in corpus.txt.gz (1 caption each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is often fastest on a shared CPU)")
    p.add_argument("--name", default=MODEL_NAME, help="model name: writes NAME.json and NAME.safetensors (the "
                   "realistic-gap world CLIP is world-clip-gap)")
    p.add_argument("--fixed-logit-scale", type=float, default=None, metavar="S",
                   help="fix the logit scale at S instead of learning it (100 keeps a real-CLIP-sized modality gap)")
    p.add_argument("--label-smoothing", type=float, default=0.0, metavar="EPS",
                   help="mix EPS of a uniform row into the contrastive targets")
    p.add_argument("--watch-every", type=int, default=0, metavar="N",
                   help="print the held-out gap and top-1 every N steps while training (200 pairs; slower)")
    p.add_argument("--cone-init", default=None, metavar="TEXT_STD,IMAGE_STD",
                   help="draw the towers' last biases from N(0, std^2): a narrow cone per tower at initialisation")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    config_path = args.out / f"{args.name}.json"
    config_path.write_text(json.dumps(model_config(), indent=2) + "\n")
    model, tokenizer = build_model(config_path, args.seed)
    if args.cone_init:
        text_std, image_std = (float(x) for x in args.cone_init.split(","))
        cone_init(model, text_std, image_std, args.seed)
    start = time.time()
    log = train(model, tokenizer, args.steps, args.batch_size, args.lr, fixed_logit_scale=args.fixed_logit_scale,
                watch_every=args.watch_every, smoothing=args.label_smoothing)
    train_seconds = time.time() - start
    weights = args.out / f"{args.name}.safetensors"
    save_weights(model, weights)
    corpus_path = world.write_corpus(args.out / "corpus.txt.gz", args.corpus_scenes, world.CORPUS_SEED)
    corpus = sorted(set(gzip.decompress(corpus_path.read_bytes()).decode().splitlines()))
    reload_diff = check_loads(config_path, weights, _half_roundtrip(model), tokenizer)
    metrics = evaluate(_half_roundtrip(model), tokenizer, args.eval_n, corpus)
    others = {name: evaluate_shipped(args.out, name, args.eval_n, corpus) for name in shipped_models(args.out)
              if name != args.name}
    facts = {
        "name": args.name,
        "command": "python -m corpora.train_world_clip " + " ".join(sys.argv[1:] if argv is None else argv),
        "train_seconds": round(train_seconds, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "vision_params": sum(p.numel() for p in model.visual.parameters()),
        "weights_bytes": weights.stat().st_size,
        "corpus_lines": args.corpus_scenes,
        "corpus_distinct": len(corpus),
        "reload_max_abs_diff": reload_diff,
        "args": {k: str(v) for k, v in vars(args).items()},
        "log": log,
    }
    write_report(args.out / "REPORT.md", model_config(), facts, metrics, others)
    write_readme(args.out / "README.md")
    print(json.dumps(metrics, indent=1))
    return metrics


def _half_roundtrip(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its weights rounded through float16, as shipped (evaluate what we ship)."""
    import copy

    clone = copy.deepcopy(model)
    clone.load_state_dict({k: _half(v).to(v.dtype) for k, v in model.state_dict().items()})
    return clone.eval()


def shipped_models(folder: Path) -> list[str]:
    """Names of the world CLIPs in ``folder`` (a ``NAME.json`` beside a ``NAME.safetensors``), sorted."""
    return sorted(p.stem for p in folder.glob("*.json") if p.with_suffix(".safetensors").is_file())


def evaluate_shipped(folder: Path, name: str, n: int, corpus: list[str]) -> dict:
    """``evaluate`` a shipped model, loaded through open_clip's public factory (for the side-by-side table)."""
    import open_clip

    open_clip.add_model_config(folder / f"{name}.json")
    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=str(folder / f"{name}.safetensors"))
    return evaluate(model.eval(), open_clip.get_tokenizer(name), n, corpus)


if __name__ == "__main__":
    main()
