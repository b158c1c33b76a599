"""COCO-style caption evaluation with pycocoevalcap, offline-safe.

:func:`score_captions` PTB-tokenises references and predictions (Stanford PTBTokenizer, a Java program shipped
inside pycocoevalcap) and runs the standard scorers one by one: BLEU-1..4, METEOR (Java, ~8 s to start),
ROUGE-L, CIDEr (pycocoevalcap's ``Cider`` is CIDEr-D: clipped counts, length penalty, x10 scale) and SPICE.
Scores are returned as pycocoevalcap computes them: BLEU, METEOR, ROUGE-L and SPICE in [0, 1], CIDEr in
[0, 10]. Papers print them x100 (BLEU-4 24.7 means 0.247; CIDEr 91.2 means 0.912); :func:`write_report` does.

Why not ``COCOEvalCap.evaluate()``: it always builds SPICE, whose first use downloads Stanford CoreNLP
(~1 GB) from the network and fails offline. Here SPICE runs only when :func:`spice_available` finds its jar
and the CoreNLP jars already on disk; otherwise it is skipped with a logged notice. SPICE is also known to
need Java 8 for its LMDB cache; with newer Java it may fail, which is then reported as an error.

Reproducing the paper's COCO Karpathy-test setting
--------------------------------------------------
DeCap (ICLR 2023), ViT-B/32, COCO in-domain: BLEU-4 24.7, METEOR 25.0, CIDEr 91.2, SPICE 18.7 (x100).

1. Split: Karpathy's ``dataset_coco.json`` (from the "Deep Visual-Semantic Alignments" release). Its
   ``split == "test"`` images are the 5,000 test images; ``train`` plus ``restval`` are the ~113k training
   images (~567k captions, 5 per image).
2. References: the 5 raw captions of each test image, ``load_coco_references("dataset_coco.json",
   split="test")`` (keys are COCO ids, ``cocoid``).
3. Encoder: CLIP ``ViT-B-32:openai`` for both the memory bank (text) and the images.
4. Memory bank: the Karpathy-train captions (``train`` + ``restval``, ~560k sentences), unit-normalised CLIP
   text embeddings. The decoder is trained on the same captions with the paper recipe (4 layers, 4 heads,
   width 768, one prefix token, label smoothing 0.1, AdamW lr 1e-5, 1k warm-up steps, batch 128, 10 epochs).
5. Inference: projection (``pd``) with tau = 0.01 over the whole bank, re-normalised, greedy decoding up to
   30 tokens, one caption per test image written as COCO results (``write_results``).
6. Scoring: ``score_captions(references, load_results(results_json))`` with all metrics (SPICE needs its
   CoreNLP models installed: run ``pycocoevalcap/spice/get_stanford_models.py`` once while online).
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import subprocess
import tempfile
from collections.abc import Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("bleu", "meteor", "rouge", "cider", "spice")
#: Column order of result dictionaries and reports.
METRIC_KEYS: tuple[str, ...] = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")

ImageId = Hashable


# ------------------------------------------------------------------------------------------- Java parts


def _package_dir() -> Path:
    import pycocoevalcap

    return Path(next(iter(pycocoevalcap.__path__)))


def java_available() -> bool:
    """True when a ``java`` executable is on the PATH (the tokenizer, METEOR and SPICE need it)."""
    return shutil.which("java") is not None


def _require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise RuntimeError(
            "COCO caption metrics need Java (PTB tokenizer, METEOR, SPICE) but `java` is not on the PATH; "
            "install a JRE, e.g. `apt-get install default-jre-headless`, and check `java -version`."
        )
    return java


def spice_available() -> bool:
    """True when SPICE can run offline: Java, the SPICE jar and the Stanford CoreNLP 3.6.0 jar plus models
    (which pycocoevalcap would otherwise download on first use). Looks at files only, never the network."""
    spice = _package_dir() / "spice"
    needed = [
        spice / "spice-1.0.jar",
        spice / "lib" / "stanford-corenlp-3.6.0.jar",
        spice / "lib" / "stanford-corenlp-3.6.0-models.jar",
    ]
    return java_available() and all(path.is_file() for path in needed)


def tokenize(captions: Mapping[ImageId, list[str]]) -> dict[ImageId, list[str]]:
    """PTB-tokenise captions exactly like pycocoevalcap's ``PTBTokenizer`` (lower-case, punctuation removed).

    Differences that only make it sturdier: the temporary file goes to the system temp folder (not the
    installed package, which may be read-only), input and output are UTF-8, any line break inside a caption
    becomes a space, and a mismatched line count raises instead of silently shifting captions.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, STANFORD_CORENLP_3_4_1_JAR

    java = _require_java()
    keys = [key for key, texts in captions.items() for _ in texts]
    lines = [" ".join(str(text).splitlines()) for texts in captions.values() for text in texts]
    if not lines:
        return {key: [] for key in captions}
    jar = _package_dir() / "tokenizer" / STANFORD_CORENLP_3_4_1_JAR
    with tempfile.TemporaryDirectory(prefix="decapflow-ptb-") as tmp:
        source = Path(tmp) / "captions.txt"
        source.write_text("\n".join(lines), encoding="utf-8")
        command = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                   "-preserveLines", "-lowerCase", "-encoding", "UTF-8", str(source)]
        done = subprocess.run(command, capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"PTB tokenizer failed ({done.returncode}): {done.stderr.decode(errors='replace')[-500:]}")
    out = done.stdout.decode("utf-8").split("\n")
    if len(out) < len(lines) or any(out[len(lines):]):
        raise RuntimeError(f"PTB tokenizer returned {len(out)} lines for {len(lines)} captions")
    tokenized: dict[ImageId, list[str]] = {key: [] for key in captions}
    for key, line in zip(keys, out, strict=False):
        tokenized[key].append(" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS))
    return tokenized


# -------------------------------------------------------------------------------------------- scoring


def check_ids(references: Mapping[ImageId, list[str]], predictions: Mapping[ImageId, str]):
    """``(missing, extra)``: reference ids with no prediction, and prediction ids with no references."""
    missing = [key for key in references if key not in predictions]
    extra = [key for key in predictions if key not in references]
    return missing, extra


def _validate(references, predictions, require_all: bool) -> list[ImageId]:
    """The image ids to score (those predicted), or a ValueError that says what is wrong."""
    if not predictions:
        raise ValueError("no predictions to evaluate")
    missing, extra = check_ids(references, predictions)
    if extra:
        raise ValueError(f"{len(extra)} predicted image ids have no references (e.g. {extra[:5]}); "
                         "are the predictions for this annotation file / split, and are ids ints vs strings?")
    if missing and require_all:
        raise ValueError(f"{len(missing)} of {len(references)} reference images have no prediction "
                         f"(e.g. {missing[:5]})")
    if missing:
        logger.info("scoring %d predicted images; %d reference images have no prediction",
                    len(predictions), len(missing))
    for key, caption in predictions.items():
        if not isinstance(caption, str):
            raise ValueError(f"prediction for image {key!r} must be one string, got {type(caption).__name__}")
        if not references[key]:
            raise ValueError(f"image {key!r} has an empty reference list")
    return list(predictions)


@functools.lru_cache(maxsize=1)
def _spice_notice() -> None:
    """Said once per process, however many strategies are scored."""
    logger.warning("SPICE skipped: its Stanford CoreNLP models are not installed (they need a download; "
                   "see decapflow.evaluation.evaluate.spice_available)")


def _selected(metrics: Iterable[str] | None) -> list[str]:
    chosen = list(METRICS) if metrics is None else [m.lower() for m in metrics]
    unknown = sorted(set(chosen) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {METRICS}")
    if "spice" in chosen and not spice_available():
        _spice_notice()
        chosen.remove("spice")
    return chosen


def _run_scorer(name: str, gts: dict, res: dict, meteor: Any = None) -> dict[str, float]:
    """One pycocoevalcap scorer on tokenised ``gts`` {id: [refs]} and ``res`` {id: [hypothesis]} (``meteor``: the
    running METEOR scorer to use for ``"meteor"``; its Java start-up costs ~8 s, so callers share one)."""
    if name == "bleu":
        from pycocoevalcap.bleu.bleu import Bleu

        scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
        return {f"BLEU-{n}": float(s) for n, s in enumerate(scores, start=1)}
    if name == "meteor":
        return {"METEOR": float(meteor.compute_score(gts, res)[0])}
    if name == "rouge":
        from pycocoevalcap.rouge.rouge import Rouge

        return {"ROUGE-L": float(Rouge().compute_score(gts, res)[0])}
    if name == "cider":
        from pycocoevalcap.cider.cider import Cider

        return {"CIDEr": float(Cider().compute_score(gts, res)[0])}
    from pycocoevalcap.spice.spice import Spice

    return {"SPICE": float(Spice().compute_score(gts, res)[0])}


def score_captions(
    references: Mapping[ImageId, list[str]],
    predictions: Mapping[ImageId, str],
    metrics: Iterable[str] | None = None,
    require_all: bool = False,
) -> dict[str, float]:
    """Corpus-level COCO caption metrics of ``predictions`` (one caption per image) against ``references``.

    ``metrics``: a subset of ``("bleu", "meteor", "rouge", "cider", "spice")``; None means all (SPICE only
    when :func:`spice_available`). Images are those predicted; a predicted id without references is an
    error; reference images without a prediction are allowed (logged) unless ``require_all``.
    Returns ``{"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"}`` (those computed) as floats on
    pycocoevalcap's scale: [0, 1], CIDEr [0, 10].
    """
    return score_many(references, {0: predictions}, metrics, require_all)[0]


def score_many(
    references: Mapping[ImageId, list[str]],
    runs: Mapping[Hashable, Mapping[ImageId, str]],
    metrics: Iterable[str] | None = None,
    require_all: bool = False,
) -> dict[Hashable, dict[str, float]]:
    """:func:`score_captions` of several prediction sets (``{run: {image_id: caption}}``) against the same
    references: one PTB-tokenizer run (one Java start, references and predictions tagged apart) and one METEOR
    process for all of them instead of a Java start-up (~1 s, METEOR ~8 s) per set."""
    if not runs:
        return {}
    ids = {name: _validate(references, predictions, require_all) for name, predictions in runs.items()}
    chosen = _selected(metrics)
    wanted = dict.fromkeys(key for keys in ids.values() for key in keys)
    tokenized = tokenize({("ref", key): list(references[key]) for key in wanted}
                         | {("hyp", n, key): [runs[name][key]] for n, name in enumerate(runs) for key in ids[name]})
    meteor = None
    if "meteor" in chosen:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
    scores: dict[Hashable, dict[str, float]] = {}
    try:
        for n, name in enumerate(runs):
            gts = {key: tokenized[("ref", key)] for key in ids[name]}
            res = {key: tokenized[("hyp", n, key)] for key in ids[name]}
            results: dict[str, float] = {}
            for metric in chosen:
                results |= _run_scorer(metric, gts, res, meteor)
            scores[name] = {key: results[key] for key in METRIC_KEYS if key in results}
    finally:
        del meteor  # its __del__ stops the Java process
    return scores


# ------------------------------------------------------------------------------------------------- files


def load_coco_references(annotations_json: str | Path, split: str | None = None):
    """References from a caption annotation file: ``(references {image_id: [captions]}, filename_to_id)``.

    Two formats are understood:

    * COCO captions (``captions_val2014.json``): ``images`` [{id, file_name}] and ``annotations``
      [{image_id, caption}]. ``split`` must be None.
    * Karpathy splits (``dataset_coco.json``): ``images`` [{cocoid, filename, split, sentences: [{raw}]}]; ids
      are COCO ids; ``split`` ("test", "val", "train", "restval") keeps only those images.
    """
    data = json.loads(Path(annotations_json).read_text(encoding="utf-8"))
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{annotations_json}: not a COCO or Karpathy caption file (no 'images' list)")
    if "annotations" in data:
        if split is not None:
            raise ValueError(f"{annotations_json} is a COCO annotation file; it has no splits (got split={split!r})")
        references: dict[ImageId, list[str]] = {image["id"]: [] for image in images}
        for ann in data["annotations"]:
            if ann["image_id"] not in references:
                raise ValueError(f"{annotations_json}: annotation for unknown image id {ann['image_id']!r}")
            references[ann["image_id"]].append(ann["caption"])
        return references, {image["file_name"]: image["id"] for image in images}
    kept = [image for image in images if split is None or image.get("split") == split]
    if not kept:
        raise ValueError(f"{annotations_json}: no images with split={split!r}")
    references = {image["cocoid"]: [s["raw"] for s in image["sentences"]] for image in kept}
    return references, {image["filename"]: image["cocoid"] for image in kept}


def load_results(results_json: str | Path) -> dict[ImageId, str]:
    """Predictions from a COCO results file: a JSON list of ``{"image_id": ..., "caption": ...}``.

    A second caption for the same image id is an error (the COCO tools would crash on it later, and silently
    keeping one would hide a bug in whatever wrote the file).
    """
    data = json.loads(Path(results_json).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{results_json}: expected a JSON list of {{'image_id', 'caption'}} objects")
    predictions: dict[ImageId, str] = {}
    duplicates: list[ImageId] = []
    for n, item in enumerate(data):
        if not isinstance(item, dict) or "image_id" not in item or "caption" not in item:
            raise ValueError(f"{results_json}: entry {n} is not an object with 'image_id' and 'caption'")
        if item["image_id"] in predictions:
            duplicates.append(item["image_id"])
        predictions.setdefault(item["image_id"], item["caption"])
    if duplicates:
        raise ValueError(f"{results_json}: {len(duplicates)} image ids have more than one caption "
                         f"(e.g. {duplicates[:5]})")
    return predictions


def coco_results(pairs: Iterable[tuple[ImageId, str]]) -> str:
    """(image id, caption) pairs as the COCO results JSON that :func:`load_results` and the COCO tools read."""
    items = [{"image_id": image_id, "caption": caption} for image_id, caption in pairs]
    return json.dumps(items, indent=1, ensure_ascii=False) + "\n"


def write_results(predictions: Mapping[ImageId, str], results_json: str | Path) -> Path:
    """Write predictions as a COCO results file."""
    path = Path(results_json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(coco_results(predictions.items()), encoding="utf-8")
    return path


def markdown_table(metrics_by_strategy: Mapping[str, Mapping[str, float]]) -> str:
    """Rows strategies, columns metrics, scores x100 with one decimal (as papers print them)."""
    present = {key for scores in metrics_by_strategy.values() for key in scores}
    columns = [key for key in METRIC_KEYS if key in present] + sorted(present - set(METRIC_KEYS))
    lines = ["| strategy | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for strategy, scores in metrics_by_strategy.items():
        cells = [f"{100 * scores[key]:.1f}" if key in scores else "–" for key in columns]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    metrics_by_strategy: Mapping[str, Mapping[str, float]],
    out_dir: str | Path,
    extra: Mapping | None = None,
    name: str = "eval",
) -> tuple[Path, Path]:
    """Write ``<name>.json`` (raw scores, pycocoevalcap scale, plus ``extra``) and ``<name>.md`` (the table).

    ``extra``: anything worth keeping beside the scores (bank, decoder, tau, number of images, ...); it must
    be JSON-serialisable and is listed under the table. Returns ``(json_path, md_path)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    payload = {"metrics": {s: dict(m) for s, m in metrics_by_strategy.items()}, "extra": dict(extra or {})}
    json_path.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    text = "# Caption evaluation\n\nScores x100 (CIDEr x100 as in papers).\n\n" + markdown_table(metrics_by_strategy)
    if extra:
        text += "\n" + "\n".join(f"- **{key}**: {value}" for key, value in extra.items()) + "\n"
    md_path.write_text(text, encoding="utf-8")
    return json_path, md_path
