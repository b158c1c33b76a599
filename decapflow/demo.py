"""The offline demo: the whole DeCap method on decapflow's synthetic world, end to end, measured.

1. ingest the world's text corpus (captions of *other* scenes than the test images) with the world's tiny CLIP;
2. train a decoder on that bank, text only (or reuse the bank's current decoder if it was trained on this
   bank version with this recipe);
3. render held-out test scenes and caption them with every strategy (pd, topk, nnd, vd, clipre);
4. score BLEU/METEOR/ROUGE-L/CIDEr against the scenes' reference captions, and attribute accuracy (does the
   caption name the right colours, shapes, counts and sizes) against the scene data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from decapflow.config import home
from decapflow.encoders import WORLD_DIR

BANK = "world"
STRATEGIES = ("pd", "topk", "nnd", "vd", "clipre")
ATTRIBUTES = ("colour", "shape", "count", "size", "object")
#: The ``--check`` floors: a broken pipeline (random decoder, wrong projection, shuffled images) cannot reach them.
FLOORS = {"pd": {"CIDEr": 0.5, "BLEU-4": 0.2, "attr-mean": 0.6}}


@dataclass
class DemoSettings:
    images: int = 200
    config: str = "decap-small"
    epochs: int = 6
    max_steps: int | None = None
    lr: float | None = None
    meteor: bool = True
    retrain: bool = False
    examples: int = 4
    threads: int | None = None
    novel: bool = False  # bank without the test scenes' attribute combinations (generalisation, not recall)


@dataclass
class DemoResult:
    table: dict[str, dict[str, float]]
    speeds: dict[str, float]
    examples: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)
    decoder: str = ""
    report: Path | None = None

    def failed_floors(self) -> list[str]:
        """Every floor in FLOORS this run did not reach (empty: the check passes)."""
        return [f"{strategy} {key} {self.table[strategy].get(key, float('nan')):.3f} < {floor}"
                for strategy, floors in FLOORS.items() for key, floor in floors.items()
                if not self.table[strategy].get(key, float("nan")) >= floor]


def attribute_scores(captions: dict[int, str], scenes: dict[int, Any]) -> dict[str, float]:
    """Mean attribute accuracy of captions against their scenes (see corpora.world.attribute_accuracy)."""
    from corpora.world import attribute_accuracy

    scores = [attribute_accuracy(text, scenes[i]) for i, text in captions.items()]
    return {f"attr-{key}": float(np.mean([s[key] for s in scores])) for key in (*ATTRIBUTES, "mean")}


def novel_corpus(path: Path, test_folder: Path) -> Path:
    """The world corpus minus every sentence whose scene has the attribute combination of a test scene.

    In the shipped corpus 98.5% of the test scenes' combinations are described (paraphrased) somewhere, which
    makes plain retrieval (clipre) a near-oracle; without them a captioner must compose what it has not read."""
    from corpora.world import CORPUS_SEED, load_scenes, make_split

    test_keys = {scene.key() for scene in load_scenes(test_folder).values()}
    corpus = make_split(24_000, CORPUS_SEED, n_captions=1)  # the lines of corpus.txt.gz, in order
    path.write_text("".join(texts[0] + "\n" for scene, texts in corpus if scene.key() not in test_keys))
    return path


def _decoder_for(bank: str, settings: DemoSettings, log: Callable[[str], None]) -> str:
    """The bank's current decoder when it fits this bank version and recipe, else a freshly trained one."""
    from decapflow.decoder.checkpoint import current_meta
    from decapflow.decoder.train import TrainRecipe
    from decapflow.memory import Registry
    from decapflow.training import train_from_bank

    recipe = TrainRecipe(epochs=settings.epochs, max_steps=settings.max_steps, num_threads=settings.threads,
                         **({"lr": settings.lr} if settings.lr else {}))
    current = current_meta(bank)
    if (current and not settings.retrain and current.get("bank_version") == Registry().open(bank).version
            and current.get("config") == settings.config and current.get("recipe") == recipe.to_dict()):
        log(f"reusing decoder {current['id']} (trained on this bank version with this recipe; --retrain to redo)")
        return current["id"]
    log(f"training a {settings.config} decoder on bank {bank!r} ({recipe.epochs} epochs max)...")
    decoder_id, result = train_from_bank(bank, config=settings.config, recipe=recipe, progress=True)
    last = result.history[-1]
    log(f"decoder {decoder_id}: val loss {last['val_loss']:.3f}, val token accuracy {last['val_acc']:.3f}")
    return decoder_id


def run_demo(settings: DemoSettings, log: Callable[[str], None] = print) -> DemoResult:
    from corpora.world import TEST_SEED, load_scenes, write_image_set
    from decapflow.captioner import Captioner, Options
    from decapflow.evaluate import write_report
    from decapflow.experiment import run_strategies, speeds, summary_rows
    from decapflow.ingest import run_ingest

    timings: dict[str, float] = {}
    folder = home() / "demo" / f"test-images-{settings.images}"
    if not (folder / "scenes.json").is_file():
        write_image_set(folder, settings.images, seed=TEST_SEED)
    scenes = load_scenes(folder)
    bank, corpus = BANK, WORLD_DIR / "corpus.txt.gz"
    if settings.novel:
        bank, corpus = f"{BANK}-novel-{settings.images}", novel_corpus(folder / "corpus-novel.txt", folder)
    t0 = time.perf_counter()
    report = run_ingest(corpus, bank, "world", progress=True)
    log(report.summary())
    timings["ingest_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    decoder_id = _decoder_for(bank, settings, log)
    timings["train_s"] = time.perf_counter() - t0

    log(f"captioning {settings.images} held-out test images (seed {TEST_SEED}) with {', '.join(STRATEGIES)}...")
    t0 = time.perf_counter()
    base = Captioner.for_bank(bank, Options())
    metrics = None if settings.meteor else ("bleu", "rouge", "cider")
    experiment = run_strategies(base, folder / "captions.json", folder, STRATEGIES, metrics=metrics)
    timings["caption_and_score_s"] = time.perf_counter() - t0
    attributes = {name: attribute_scores({i: c.caption for i, c in run.captions.items()}, scenes)
                  for name, run in experiment.runs.items()}
    table = summary_rows(experiment, attributes)
    examples = [{"image": str(folder / f"world_{i:012d}.png"), "references": experiment.references[i][:2],
                 **{name: run.captions[i].caption for name, run in experiment.runs.items()}}
                for i in experiment.image_ids[: settings.examples]]
    extra = {"bank": bank, "bank_rows": report.rows, "decoder": decoder_id, "images": len(experiment.image_ids),
             "images_per_s": speeds(experiment), "timings_s": {k: round(v, 1) for k, v in timings.items()},
             "attribute columns": "attr-*: F1 of the colours/shapes/counts/sizes/whole objects named (x100)"}
    name = "report-novel" if settings.novel else "report"
    _, md_path = write_report(table, home() / "demo", extra, name=name)
    (home() / "demo" / f"{name}-examples.json").write_text(json.dumps(examples, indent=1))
    return DemoResult(table, speeds(experiment), examples, timings, decoder_id, md_path)


def format_result(result: DemoResult) -> str:
    """Examples beside their references, then the metrics table, as the terminal shows them."""
    lines = ["", "Examples (held-out images; the corpus never saw their captions):"]
    for ex in result.examples:
        lines.append(f"  {Path(ex['image']).name}")
        lines.append(f"    reference : {ex['references'][0]}")
        for name in STRATEGIES:
            lines.append(f"    {name:<10}: {ex[name]}")
    columns = ["BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "attr-colour", "attr-shape", "attr-count", "attr-size",
               "attr-object"]
    present = [c for c in columns if any(c in row for row in result.table.values())]
    lines += ["", f"{'strategy':<9}" + "".join(f"{c:>12}" for c in present) + f"{'images/s':>10}"]
    for name, row in result.table.items():
        cells = "".join(f"{100 * row[c]:>12.1f}" if c in row else f"{'-':>12}" for c in present)
        lines.append(f"{name:<9}{cells}{result.speeds[name]:>10.0f}")
    lines.append("(scores x100; attr-*: F1 of the attributes named vs the scene; images/s after CLIP embedding)")
    lines.append(f"report: {result.report}")
    return "\n".join(lines)
