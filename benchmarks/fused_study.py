"""Retrieval-fused decoders against DeCap's on two synthetic worlds (issue 30): which recipe, which k, which query,
chosen on one world and confirmed on the other; CIDEr, attribute accuracy and images/s against ``pd`` in the same run.

Worlds (both captioned by the ``world-gap`` CLIP, whose modality gap is real CLIP's):

- ``world-gap``, the demo's: the world corpus (21,106 short captions), 200 test scenes (split TEST_SEED) with 5
  reference captions each, as ``decapflow demo`` scores them;
- ``world-rich``, held out (nothing was tuned on it): 20,000 distinct sentences of :mod:`corpora.world_text` (the
  scenes' positions and relations, 60 phrasings: another corpus and another way of speaking), the same test
  images, each scored against 5 rich sentences of its scene.

``--novel`` removes from the bank every sentence whose scene has a test scene's attribute combination (the
captioner must compose what it never read). The image mean comes from 500 unlabelled world images (split
UNLABELLED_SEED), as the demo records it. Decoders are trained once per ``--home`` and variant (a variant names a
decoder: ``plain`` is the demo's recipe; ``fused-*`` variants are retrieval-fused with the settings in VARIANTS).

    .venv/bin/python benchmarks/fused_study.py --world world-gap --home /tmp/fs-gap --variants plain,fused
    .venv/bin/python benchmarks/fused_study.py --world world-rich --novel --home /tmp/fs-rich-novel

Prints one table (strategy x decoder: CIDEr x100, attributes, images/s, x pd's speed) and a JSON line; never
assertions. Training a decap-small decoder takes ~5 minutes on 2 quiet cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ENCODER = "world-gap"
IMAGES = 200
RICH_SENTENCES = 20_000
#: Decoders: the plain one is the demo's (decap-small, 6 epochs); fused ones add the fused settings and recipe.
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "fused": {"fused": {"neighbors": 5, "fusion": "tokens"},
              "recipe": {"noise_cos": 0.8, "retrieval_noise_cos": 0.8, "exclude_cos": 0.97}},
    "fused-xattn": {"fused": {"neighbors": 5, "fusion": "xattn"},
                    "recipe": {"noise_cos": 0.8, "retrieval_noise_cos": 0.8, "exclude_cos": 0.97}},
    "fused-k3": {"fused": {"neighbors": 3, "fusion": "tokens"},
                 "recipe": {"noise_cos": 0.8, "retrieval_noise_cos": 0.8, "exclude_cos": 0.97}},
    "fused-k9": {"fused": {"neighbors": 9, "fusion": "tokens"},
                 "recipe": {"noise_cos": 0.8, "retrieval_noise_cos": 0.8, "exclude_cos": 0.97}},
    "fused-self": {"fused": {"neighbors": 5, "fusion": "tokens"},
                   "recipe": {"noise_cos": 0.8, "retrieval_noise_cos": 0.8, "exclude_cos": None}},
    "fused-clean": {"fused": {"neighbors": 5, "fusion": "tokens"},
                    "recipe": {"noise_cos": None, "retrieval_noise_cos": None, "exclude_cos": 0.97}},
    "fused-noisy": {"fused": {"neighbors": 5, "fusion": "tokens"},
                    "recipe": {"noise_cos": 0.6, "retrieval_noise_cos": 0.6, "exclude_cos": 0.97}},
    "fused-x90": {"fused": {"neighbors": 5, "fusion": "tokens"},
                  "recipe": {"noise_cos": 0.8, "retrieval_noise_cos": 0.8, "exclude_cos": 0.90}},
    "fused-entity": {"fused": {"neighbors": 5, "fusion": "tokens"},
                     "recipe": {"noise_cos": 0.8, "retrieval_noise_cos": 0.8, "exclude_cos": 0.97,
                                "entity_min_count": 3}},
}
#: Strategies per decoder kind: (name shown, Options fields).
PLAIN = [("pd", {"strategy": "pd"}), ("nnd", {"strategy": "nnd"}), ("ms", {"strategy": "ms"}),
         ("rerank", {"strategy": "rerank"})]
FUSED = [("fused q=ms", {"strategy": "fused", "query": "ms"}), ("fused q=vd", {"strategy": "fused", "query": "vd"}),
         ("fused q=pd", {"strategy": "fused", "query": "pd"}),
         ("fused l=3", {"strategy": "fused", "neighbours": 3}),
         ("rerank", {"strategy": "rerank"}),
         ("rerank ms,vd", {"strategy": "rerank", "candidates": ("ms", "vd")}),
         ("rerank ms,vd,pd", {"strategy": "rerank", "candidates": ("ms", "vd", "pd")})]


def rich_references(folder: Path) -> dict[int, list[str]]:
    """5 rich sentences of each test scene (seeded by image id), as references."""
    from corpora.world import load_scenes
    from corpora.world_text import rich_caption

    return {i: [rich_caption(scene, random.Random(1_000_003 * i + j)) for j in range(5)]
            for i, scene in sorted(load_scenes(folder).items())}


def corpus_for(world: str, novel: bool, folder: Path, home: Path) -> Path:
    from corpora.world import load_scenes
    from decapflow.encoders import WORLD_DIR
    from decapflow.lifecycle.demo import novel_corpus

    if world == "world-gap":
        return novel_corpus(home / "corpus-novel.txt", folder) if novel else WORLD_DIR / "corpus.txt.gz"
    from corpora.world_text import rich_split

    banned = {scene.key() for scene in load_scenes(folder).values()} if novel else set()
    path = home / f"corpus-rich{'-novel' if novel else ''}.txt"
    if not path.exists():
        seen, lines = set(), []
        for scene, text in rich_split(3 * RICH_SENTENCES):
            if text not in seen and scene.key() not in banned:
                seen.add(text)
                lines.append(text)
            if len(lines) == RICH_SENTENCES:
                break
        path.write_text("".join(t + "\n" for t in lines))
    return path


def decoder_for(bank: str, variant: str, steps: int | None, log: Any) -> str:
    """The decoder trained for ``variant`` in this home (trained now when missing)."""
    from decapflow.config import home
    from decapflow.decoder.train import TrainRecipe
    from decapflow.lifecycle.training import train_from_bank

    made = home() / "variants.json"
    known = json.loads(made.read_text()) if made.exists() else {}
    key = f"{bank}:{variant}:{steps}"
    if key in known:
        return known[key]
    spec = VARIANTS[variant]
    recipe = TrainRecipe(epochs=6, max_steps=steps, **spec.get("recipe", {}))
    log(f"training {variant} on {bank} ...")
    start = time.perf_counter()
    decoder_id, result = train_from_bank(bank, config="decap-small", recipe=recipe, progress=False,
                                         promote=False, fused=spec.get("fused"))
    tokens = sum(h["tokens_per_s"] * h["seconds"] for h in result.history) / sum(h["seconds"] for h in result.history)
    log(f"  {decoder_id}: {time.perf_counter() - start:.0f} s, {tokens:,.0f} tokens/s, val loss "
        f"{result.best_val_loss:.3f}")
    known[key] = decoder_id
    known[f"{key}:tokens_per_s"] = tokens
    made.write_text(json.dumps(known, indent=1))
    return decoder_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", choices=["world-gap", "world-rich"], default="world-gap")
    parser.add_argument("--novel", action="store_true")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--variants", default="plain,fused")
    parser.add_argument("--steps", type=int, help="Cap training steps (a smoke run).")
    parser.add_argument("--images", type=int, default=IMAGES)
    args = parser.parse_args()
    os.environ["DECAPFLOW_HOME"] = str(args.home)
    args.home.mkdir(parents=True, exist_ok=True)
    from corpora.world import TEST_SEED, load_scenes, write_image_set
    from decapflow.bank.ingest import run_ingest
    from decapflow.caption.captioner import Captioner, Options
    from decapflow.config import home
    from decapflow.decoder.registry import decoders
    from decapflow.evaluation.evaluate import score_captions
    from decapflow.evaluation.experiment import embed_annotated_images
    from decapflow.lifecycle.demo import attribute_scores, record_image_mean

    folder = home() / f"test-images-{args.images}"
    if not (folder / "scenes.json").is_file():
        write_image_set(folder, args.images, seed=TEST_SEED)
    scenes = load_scenes(folder)
    bank = f"{args.world}{'-novel' if args.novel else ''}"
    report = run_ingest(corpus_for(args.world, args.novel, folder, args.home), bank, ENCODER)
    print(report.summary(), flush=True)
    variants = args.variants.split(",")
    ids = {v: decoder_for(bank, v, args.steps, lambda m: print(m, flush=True)) for v in variants}
    reg = decoders()
    rows: list[dict[str, Any]] = []
    vectors = references = image_ids = None
    pd_speed = None
    for variant, decoder_id in ids.items():
        base = Captioner.for_bank(bank, Options(), decoder=decoder_id)
        if base.image_mean is None:
            base.image_mean = record_image_mean(base, lambda m: print(m, flush=True))
        if vectors is None:
            references, image_ids, vectors, _ = embed_annotated_images(base, folder / "captions.json", folder)
            if args.world == "world-rich":
                references = {i: r for i, r in rich_references(folder).items() if i in set(image_ids)}
        meta = reg.record(bank, decoder_id) or {}
        for name, fields in (FUSED if meta.get("fused") else PLAIN):
            fields = dict(fields)
            candidates = fields.pop("candidates", None)
            captioner = base.with_options(replace(base.options, **fields))

            def run(v: Any, captioner: Any = captioner, candidates: Any = candidates) -> list[Any]:
                return captioner._rerank(v, candidates) if candidates else captioner.caption_embeddings(v)

            run(vectors[:8])  # warm
            start = time.perf_counter()
            captions = run(vectors)
            speed = len(image_ids) / (time.perf_counter() - start)
            if name == "pd" and pd_speed is None:
                pd_speed = speed
            by_id = {i: c.caption for i, c in zip(image_ids, captions, strict=True)}
            cider = score_captions(references, by_id, metrics=("cider",))["CIDEr"]
            attr = attribute_scores(by_id, scenes)["attr-mean"]
            rows.append({"decoder": variant, "strategy": name, "cider": round(100 * cider, 1),
                         "attr": round(100 * attr, 1), "images_per_s": round(speed, 1)})
            print(f"{variant:<12} {name:<12} CIDEr {100 * cider:6.1f}  attr {100 * attr:5.1f}  {speed:6.1f} img/s",
                  flush=True)
    known = json.loads((home() / "variants.json").read_text())
    print(f"\n{args.world}{' --novel' if args.novel else ''}: {len(image_ids)} test images, bank {report.rows:,} rows\n")
    print("| decoder | strategy | CIDEr | attr | images/s | x pd |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['decoder']} | {r['strategy']} | {r['cider']} | {r['attr']} | {r['images_per_s']} | "
              f"{r['images_per_s'] / pd_speed:.2f} |" if pd_speed else "")
    print("training tokens/s: " + ", ".join(f"{v} {known.get(f'{bank}:{v}:{args.steps}:tokens_per_s', 0):,.0f}"
                                           for v in variants))
    print(json.dumps({"world": args.world, "novel": args.novel, "rows": rows}))


if __name__ == "__main__":
    main()
