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
#: The demo's world CLIPs (built-in encoder specs); each gets its own banks, named after it. ``world-gap`` (the
#: default) has real CLIP's modality gap (~0.8), so projection matters as it does with real CLIP; ``world``, the
#: first world CLIP, has almost none (0.08), and there raw visual decoding (vd) works about as well as pd.
ENCODERS = ("world-gap", "world")
STRATEGIES = ("pd", "topk", "nnd", "vd", "clipre", "ms", "rerank")
#: Unlabelled world images (split UNLABELLED_SEED) whose mean embedding ms and rerank use.
UNLABELLED_IMAGES = 500
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
    #: Also train a retrieval-fused decoder (same recipe plus FUSED_RECIPE; not made current) and add its rows:
    #: ``fused`` (its strategy) and ``rerank+fused`` (rerank's candidates decoded by it). About 1.2x the training.
    fused: bool = False
    encoder: str = ENCODERS[0]  # one of ENCODERS; also the bank's name (bank "world" for encoder "world")
    #: The memory-size study (decapflow.evaluation.memory_size): bank subsets of these sizes, with these strategies (no sizes:
    #: no study). Seed 0, nested subsets; ``all`` reuses the strategy table's captions, so it costs 6 decodes of the
    #: test images plus one scoring pass: 126-133 s measured on 2 busy cores (load ~5), 0.7-1.0x the caption step.
    memory_sizes: tuple[int | str, ...] = (100, 1000, 5000, "all")
    memory_strategies: tuple[str, ...] = ("pd", "nnd", "clipre")


@dataclass
class DemoResult:
    table: dict[str, dict[str, float]]
    speeds: dict[str, float]
    examples: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)
    decoder: str = ""
    report: Path | None = None
    memory_size: Any = None  # a decapflow.evaluation.memory_size.MemorySizeStudy, when the study ran
    memory_plot: Path | None = None
    default: str = ""  # the strategy ``decapflow caption`` runs on this bank (auto)

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


def _decoder_for(bank: str, settings: DemoSettings, log: Callable[[str], None], fused: bool = False) -> str:
    """The decoder of this bank version and recipe (the current one; with ``fused``, the newest fused one) when
    there is one, else a freshly trained one (a fused one is registered, not made current)."""
    from decapflow.bank.memory import Registry
    from decapflow.decoder.checkpoint import current_meta
    from decapflow.decoder.recipe import FUSED_RECIPE
    from decapflow.decoder.registry import decoders
    from decapflow.decoder.train import TrainRecipe
    from decapflow.lifecycle.training import train_from_bank

    recipe = TrainRecipe.from_dict({**(FUSED_RECIPE if fused else {}), "epochs": settings.epochs,
                                    "max_steps": settings.max_steps, "num_threads": settings.threads,
                                    **({"lr": settings.lr} if settings.lr else {})})
    version = Registry().open(bank).version
    if fused:
        known = [d for d in decoders().list(bank) if d.get("fused")]
    else:
        known = [current] if (current := current_meta(bank)) else []
    fitting = [d for d in known if d.get("bank_version") == version and d.get("config") == settings.config
               and d.get("recipe") == recipe.to_dict()]
    if fitting and not settings.retrain:
        log(f"reusing {'fused ' if fused else ''}decoder {fitting[-1]['id']} (trained on this bank version with this "
            f"recipe; --retrain to redo)")
        return fitting[-1]["id"]
    kind = "retrieval-fused " if fused else ""
    log(f"training a {kind}{settings.config} decoder on bank {bank!r} ({recipe.epochs} epochs max)...")
    decoder_id, result = train_from_bank(bank, config=settings.config, recipe=recipe, progress=True,
                                         promote=not fused, fused=fused or None)
    last = result.history[-1]
    log(f"decoder {decoder_id}: val loss {last['val_loss']:.3f}, val token accuracy {last['val_acc']:.3f}")
    return decoder_id


def run_demo(settings: DemoSettings, log: Callable[[str], None] = print) -> DemoResult:
    from corpora.world import TEST_SEED, load_scenes, write_image_set
    from decapflow.bank.ingest import run_ingest
    from decapflow.caption.captioner import Captioner, Options
    from decapflow.evaluation.evaluate import write_report
    from decapflow.evaluation.experiment import run_strategies, speeds, summary_rows

    if settings.encoder not in ENCODERS:
        raise ValueError(f"the demo's encoder is one of {', '.join(ENCODERS)}, not {settings.encoder!r}")
    timings: dict[str, float] = {}
    folder = home() / "demo" / f"test-images-{settings.images}"
    if not (folder / "scenes.json").is_file():
        write_image_set(folder, settings.images, seed=TEST_SEED)
    scenes = load_scenes(folder)
    bank, corpus = settings.encoder, WORLD_DIR / "corpus.txt.gz"
    if settings.novel:
        bank, corpus = f"{bank}-novel-{settings.images}", novel_corpus(folder / "corpus-novel.txt", folder)
    t0 = time.perf_counter()
    report = run_ingest(corpus, bank, settings.encoder, progress=True)
    log(report.summary())
    timings["ingest_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    decoder_id = _decoder_for(bank, settings, log)
    timings["train_s"] = time.perf_counter() - t0

    log(f"captioning {settings.images} held-out test images (seed {TEST_SEED}) with {', '.join(STRATEGIES)}...")
    t0 = time.perf_counter()
    base = Captioner.for_bank(bank, Options())
    if base.image_mean is None:
        base.image_mean = record_image_mean(base, log)
    metrics = None if settings.meteor else ("bleu", "rouge", "cider")
    experiment = run_strategies(base, folder / "captions.json", folder, STRATEGIES, metrics=metrics)
    timings["caption_and_score_s"] = time.perf_counter() - t0
    if settings.fused:
        experiment = _with_fused(experiment, base, bank, settings, folder, metrics, timings, log)
    attributes = {name: attribute_scores({i: c.caption for i, c in run.captions.items()}, scenes)
                  for name, run in experiment.runs.items()}
    table = summary_rows(experiment, attributes)
    name = "report-novel" if settings.novel else "report"
    study = plot = None
    if settings.memory_sizes:
        from decapflow.evaluation.memory_size import run_study, write_study

        log(f"memory-size study: {', '.join(map(str, settings.memory_sizes))} rows with "
            f"{', '.join(settings.memory_strategies)}...")
        t0 = time.perf_counter()
        study = run_study(base, experiment.references, experiment.image_ids, experiment.vectors,
                          settings.memory_sizes, seed=0, strategies=settings.memory_strategies, metrics=metrics,
                          extra_scores=lambda caps: {"attr-mean": attribute_scores(caps, scenes)["attr-mean"]},
                          full_bank={name: ({i: c.caption for i, c in run.captions.items()}, run.seconds)
                                     for name, run in experiment.runs.items()})
        _, _, plot = write_study(study, home() / "demo", name=f"{name}-memory-size")
        timings["memory_size_s"] = time.perf_counter() - t0
    examples = [{"image": str(folder / f"world_{i:012d}.png"), "references": experiment.references[i][:2],
                 **{name: run.captions[i].caption for name, run in experiment.runs.items()}}
                for i in experiment.image_ids[: settings.examples]]
    extra = {"bank": bank, "default_strategy": base.strategy, "bank_rows": report.rows, "decoder": decoder_id, "images": len(experiment.image_ids),
             "images_per_s": speeds(experiment), "timings_s": {k: round(v, 1) for k, v in timings.items()},
             "attribute columns": "attr-*: F1 of the colours/shapes/counts/sizes/whole objects named (x100)"}
    _, md_path = write_report(table, home() / "demo", extra, name=name)
    if study is not None:
        from decapflow.evaluation.memory_size import markdown

        with md_path.open("a", encoding="utf-8") as report_md:
            report_md.write(f"\n## Memory size\n\nThe same images against random subsets of the bank (nested, "
                            f"seed 0), same decoder; x100.\n\n{markdown(study)}\n![memory size]({plot.name})\n")
    (home() / "demo" / f"{name}-examples.json").write_text(json.dumps(examples, indent=1))
    return DemoResult(table, speeds(experiment), examples, timings, decoder_id, md_path, study, plot, base.strategy)


def _with_fused(experiment: Any, base: Any, bank: str, settings: DemoSettings, folder: Path,
                metrics: Any, timings: dict[str, float], log: Callable[[str], None]) -> Any:
    """The experiment plus a fused decoder's rows (``fused``, ``rerank+fused``) on the same image embeddings."""
    from decapflow.caption.captioner import Captioner, Options
    from decapflow.evaluation.experiment import run_strategy

    t0 = time.perf_counter()
    fused_id = _decoder_for(bank, settings, log, fused=True)
    timings["train_fused_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    captioner = Captioner.for_bank(bank, Options(), decoder=fused_id)
    captioner.image_mean = base.image_mean
    for name, strategy in (("fused", "fused"), ("rerank+fused", "rerank")):
        experiment.runs[name] = run_strategy(captioner, strategy, experiment.references, experiment.image_ids,
                                             experiment.vectors, metrics, name=name)
    timings["caption_fused_s"] = time.perf_counter() - t0
    return experiment


def record_image_mean(captioner: Any, log: Callable[[str], None] = print) -> Any:
    """Record the mean embedding of UNLABELLED_IMAGES world images (no captions; not the test images) for the
    captioner's bank, as ``decapflow memory image-mean`` would, and return it."""
    from corpora.world import UNLABELLED_SEED, make_split, render
    from decapflow.caption.modality import record_image_mean
    from decapflow.lifecycle.gate import add_domain_eval_set

    scenes = [scene for scene, _ in make_split(UNLABELLED_IMAGES, UNLABELLED_SEED, n_captions=1)]
    source = f"world split {UNLABELLED_SEED}, {UNLABELLED_IMAGES} unlabelled images"
    mean, gap, vectors = record_image_mean(captioner.bank, captioner.encoder, [render(scene) for scene in scenes],
                                           source, text_mean=captioner.text_mean)
    add_domain_eval_set(captioner.bank, vectors, source)
    log(f"recorded the mean embedding of {UNLABELLED_IMAGES} unlabelled world images (for ms, rerank and the "
        f"default strategy; the gate's domain set); modality gap {gap:.3f}")
    return mean


def format_result(result: DemoResult) -> str:
    """Examples beside their references, then the metrics table, as the terminal shows them."""
    lines = ["", "Examples (held-out images; the corpus never saw their captions):"]
    for ex in result.examples:
        lines.append(f"  {Path(ex['image']).name}")
        lines.append(f"    reference : {ex['references'][0]}")
        for name in result.table:
            lines.append(f"    {name:<12}: {ex[name]}")
    columns = ["BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "attr-colour", "attr-shape", "attr-count", "attr-size",
               "attr-object"]
    present = [c for c in columns if any(c in row for row in result.table.values())]
    lines += ["", f"{'strategy':<13}" + "".join(f"{c:>12}" for c in present) + f"{'images/s':>10}"]
    for name, row in result.table.items():
        cells = "".join(f"{100 * row[c]:>12.1f}" if c in row else f"{'-':>12}" for c in present)
        marked = f"{name}*" if name == result.default else name
        lines.append(f"{marked:<13}{cells}{result.speeds[name]:>10.0f}")
    lines.append("(scores x100; attr-*: F1 of the attributes named vs the scene; images/s after CLIP embedding; "
                 "* the default, what 'decapflow caption' runs on this bank)")
    if result.memory_size is not None:
        lines += ["", "Memory size (CIDEr x100 against bank rows; random nested subsets, seed 0, same decoder):"]
        rows = sorted({run.rows for run in result.memory_size.runs})
        lines.append(f"{'strategy':<9}" + "".join(f"{n:>10}" for n in rows))
        for strategy, by_size in result.memory_size.table().items():
            lines.append(f"{strategy:<9}" + "".join(f"{100 * m['CIDEr']:>10.1f}" for m in by_size.values()))
        lines.append(f"plot: {result.memory_plot}")
    lines.append(f"report: {result.report}")
    return "\n".join(lines)
