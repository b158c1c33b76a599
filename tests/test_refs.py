"""Bank references on every reader: ``BANK@TAG`` / ``BANK@vN`` in the library, the CLI and the HTTP API, a server
that follows a moved tag, and writers that refuse a pinned reference before changing anything."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from PIL import Image

from decapflow.bank.ingest import run_ingest
from decapflow.bank.memory import Registry
from decapflow.bank.refs import BankRef, check_tag, writable
from decapflow.bank.versions import set_tag
from decapflow.caption.captioner import Captioner, Options
from decapflow.cli import main
from decapflow.errors import BankError, UnknownVersion

SHAPES = {"a red circle", "a blue square", "two green triangles", "a small yellow circle", "three red squares",
          "a large blue triangle", "a purple circle on the left", "two white squares"}  # conftest.SENTENCES
NEW = ["a golden hexagon", "a silver star"]


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, list(args))
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture
def tagged(own_home: Path, tmp_path: Path, tiny_encoder_spec: str) -> tuple[int, int]:
    """Bank 'shapes' with two sentences more than its 8, tag 'prod' on the 8-row version: (old, new) versions."""
    old = Registry().open("shapes").version
    corpus = tmp_path / "more.txt"
    corpus.write_text("\n".join(NEW) + "\n")
    run_ingest(corpus, "shapes", tiny_encoder_spec)
    bank = Registry().open("shapes")
    set_tag(bank, "prod", old)
    assert bank.version > old and len(bank) == 10
    return old, bank.version


def png(colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), colour).save(buffer, "PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- parsing
def test_parse_format_and_bad_input() -> None:
    for text, name, tag, version in [("coco", "coco", None, None), ("coco@prod", "coco", "prod", None),
                                     ("coco@v12", "coco", None, 12), ("coco_2017@blue-green", "coco_2017", "blue-green",
                                                                      None)]:
        ref = BankRef.parse(text)
        assert (ref.name, ref.tag, ref.version, ref.pinned, str(ref)) == (name, tag, version, text != name, text)
        assert BankRef.parse(ref) is ref
    for bad in ("", "co co", "@prod", "coco@", "coco@@prod", "coco@pr od", "coco@_clone-x", "coco@1st"):
        with pytest.raises(BankError, match="invalid bank (name|reference)"):
            BankRef.parse(bad)
    with pytest.raises(BankError, match="not 'v' followed by digits"):
        check_tag("v12")
    assert writable("coco", "ingest") == "coco"
    with pytest.raises(BankError, match=r"ingest writes to the newest version .*'coco@prod' pins a version .*give 'coco'"):
        writable("coco@prod", "ingest")


# ---------------------------------------------------------------------------------------------- library and CLI
def test_library_and_cli_caption_the_tagged_version(tagged: tuple[int, int], images: Path) -> None:
    old, new = tagged
    every = Options(strategy="clipre", n_support=10)
    prod = Captioner.for_bank("shapes@prod", every)
    pinned = Captioner.for_bank(f"shapes@v{old}", every)
    latest = Captioner.for_bank("shapes", every)
    assert (prod.bank_version, pinned.bank_version, latest.bank_version) == (old, old, new)
    assert (prod.bank_ref, prod.bank.name, pinned.bank_ref) == ("shapes@prod", "shapes", f"shapes@v{old}")
    assert len(prod.vectors) == 8 and len(latest.vectors) == 10
    image = Image.new("RGB", (48, 40), "red")
    assert {t for t, _ in prod.caption([image])[0].support} == SHAPES  # every row of the tagged version, no other
    assert {t for t, _ in latest.caption([image])[0].support} == SHAPES | set(NEW)
    # pd with the bank's current decoder, through the library and the CLI
    import decapflow

    library = decapflow.caption_images([images], memory="shapes@prod", strategy="pd")
    assert all({t for t, _ in c.support} <= SHAPES for c in library)
    out = run("caption", "--memory", "shapes@prod", str(images), "--strategy", "pd", "--format", "jsonl")
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [c["caption"] for c in lines] == [c.caption for c in library]
    assert [c["support"] for c in lines] == [[list(s) for s in c.support] for c in library]
    assert f"bank shapes@prod: version {old}" in out.stderr


def test_unknown_tags_and_versions_list_what_exists(tagged: tuple[int, int], images: Path) -> None:
    old, new = tagged
    with pytest.raises(UnknownVersion, match=rf"no tag 'nope' \(tags: prod \(v{old}\)\)"):
        Registry().open("shapes@nope")
    for ref, says in [("shapes@nope", f"has no tag 'nope' (tags: prod (v{old}))"),
                      ("shapes@v99", "has no version 99 (versions kept: 1-"),
                      ("ghost@prod", "no memory bank named 'ghost'"),
                      ("shapes@bad tag", "invalid bank reference 'shapes@bad tag'")]:
        for args in (["caption", "--memory", ref, str(images)], ["memory", "show", ref], ["train", "--memory", ref,
                                                                                        "--prefect", "off"]):
            out = run(*args, ok=False)
            assert out.exit_code == 1, (args, out.output)
            assert says in out.output and len(out.output.strip().splitlines()) == 1, (args, out.output)
            assert "Traceback" not in out.output
    assert Registry().open("shapes").version == new  # nothing changed


def test_writers_refuse_a_pinned_reference_and_change_nothing(tagged: tuple[int, int], tmp_path: Path,
                                                              tiny_encoder_spec: str, images: Path) -> None:
    old, new = tagged
    corpus = tmp_path / "c.txt"
    corpus.write_text("a cyan pentagon\n")
    for ref in ("shapes@prod", f"shapes@v{old}", "fresh@prod"):
        out = run("ingest", str(corpus), "--memory", ref, "--encoder", tiny_encoder_spec, "--prefect", "off", ok=False)
        assert out.exit_code == 1 and f"{ref!r} pins a version (read-only)" in out.output, out.output
        assert f"give {ref.split('@')[0]!r}" in out.output and len(out.output.strip().splitlines()) == 1
        with pytest.raises(BankError, match="pins a version"):
            run_ingest(corpus, ref, tiny_encoder_spec)
    parquet = tmp_path / "e.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a cyan pentagon"], "vector": [[1.0] + [0.0] * 31]}), parquet)
    refused = [["memory", "import", str(parquet), "--memory", "shapes@prod", "--encoder", tiny_encoder_spec],
               ["memory", "index", "shapes@prod"], ["memory", "eval-set", f"shapes@v{old}"],
               ["memory", "image-mean", "shapes@prod", "--images", str(images)]]
    for args in refused:
        out = run(*args, ok=False)
        assert out.exit_code == 1 and "pins a version (read-only)" in out.output, (args, out.output)
    out = run("decoder", "list", "shapes@prod", ok=False)
    assert out.exit_code == 1 and "give 'shapes'" in out.output
    bank = Registry().open("shapes")
    assert (bank.version, len(bank), Registry().names()) == (new, 10, ["shapes"])


def test_show_search_and_export_read_the_pinned_version(tagged: tuple[int, int], tmp_path: Path) -> None:
    old, new = tagged
    info = json.loads(run("memory", "show", "shapes@prod", "--json").stdout)
    assert (info["ref"], info["name"], info["version"], info["rows"]) == ("shapes@prod", "shapes", old, 8)
    assert f"bank      shapes@v{new}\nrows      10" in run("memory", "show", f"shapes@v{new}").output
    hits = run("memory", "search", f"shapes@v{old}", NEW[0], "-k", "10", "--json")
    assert {h["text"] for h in json.loads(hits.stdout)} == SHAPES and f"version {old}" in hits.stderr
    out = run("memory", "export", "shapes@prod", str(tmp_path / "prod.txt"))
    assert f"wrote 8 rows of bank shapes@prod (version {old})" in out.output
    assert set((tmp_path / "prod.txt").read_text().splitlines()) == SHAPES


def test_eval_reads_the_pinned_version(tagged: tuple[int, int], images: Path, tmp_path: Path) -> None:
    old, _ = tagged
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": i, "file_name": f"img_{i:06d}.png"} for i in (7, 8, 9)],
                               "annotations": [{"image_id": i, "id": i, "caption": "a red circle"} for i in (7, 8, 9)]}))
    out = run("eval", "--annotations", str(ann), "--images", str(images), "--memory", f"shapes@v{old}",
              "--strategy", "pd", "--no-meteor", "--json", "--output-dir", str(tmp_path / "ev"))
    report = json.loads(out.stdout)
    assert (report["bank"], report["ref"], report["bank_version"]) == ("shapes", f"shapes@v{old}", old)
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["extra"]["ref"] == f"shapes@v{old}"


def test_train_on_a_pinned_version_records_it(tagged: tuple[int, int]) -> None:
    from decapflow.decoder.checkpoint import list_decoders
    from decapflow.lifecycle.training import train_from_bank

    old, new = tagged
    with pytest.raises(BankError, match=f"names version {old}, not {new}"):
        train_from_bank("shapes@prod", version=new)
    out = run("train", "--memory", f"shapes@v{old}", "--config", "tiny", "--max-steps", "2", "--batch-size", "4",
              "--prefect", "off", "--json")
    result = json.loads(out.stdout)
    assert (result["bank"], result["ref"], result["bank_version"]) == ("shapes", f"shapes@v{old}", old)
    trained = [d for d in list_decoders("shapes") if d["id"] == result["decoder"]]
    assert trained[0]["bank_version"] == old and trained[0]["bank_ref"] == f"shapes@v{old}"
    assert trained[0]["bank_rows"] == 8


# ---------------------------------------------------------------------------------------------- HTTP
def test_server_follows_a_moved_tag_and_stays_on_a_version(tagged: tuple[int, int], serve_app) -> None:
    old, new = tagged
    url = serve_app()

    def caption(memory: str) -> httpx.Response:
        body = {"memory": memory, "images": [base64.b64encode(png()).decode()], "strategy": "clipre",
                "n_support": 10}
        return httpx.post(f"{url}/v1/captions", json=body, timeout=60)

    def seen(answer: httpx.Response) -> tuple[int, set[str]]:
        assert answer.status_code == 200, answer.text
        result = answer.json()["results"][0]
        return result["bank_version"], {s["text"] for s in result["support"]}

    first = caption("shapes@prod")
    assert (first.json()["memory"], first.json()["bank"]) == ("shapes@prod", "shapes")
    assert seen(first) == (old, SHAPES)
    assert seen(caption(f"shapes@v{old}")) == (old, SHAPES)
    assert seen(caption("shapes")) == (new, SHAPES | set(NEW))
    set_tag(Registry().open("shapes"), "prod", new)  # the tag moves: the next request follows it
    assert seen(caption("shapes@prod")) == (new, SHAPES | set(NEW))
    assert seen(caption(f"shapes@v{old}")) == (old, SHAPES)  # a fixed version stays

    info = httpx.get(f"{url}/v1/banks/shapes@v{old}").json()
    assert (info["ref"], info["version"], info["rows"], info["tags"]) == (f"shapes@v{old}", old, 8, {"prod": new})
    assert info["decoder"]["id"]
    hits = httpx.get(f"{url}/v1/banks/shapes@v{old}/search", params={"q": NEW[0], "k": 10}).json()
    assert {h["text"] for h in hits} == SHAPES

    for memory, status, code, says in [("shapes@nope", 404, "unknown_version", "(tags: prod (v"),
                                       ("shapes@v99", 404, "unknown_version", "has no version 99 (versions kept"),
                                       ("ghost@prod", 404, "unknown_bank", "banks: shapes"),
                                       ("shapes@@x", 422, "invalid_parameter", "invalid bank reference")]:
        for answer in (caption(memory), httpx.get(f"{url}/v1/banks/{memory}")):
            assert answer.status_code == status, (memory, answer.text)
            error = answer.json()["error"]
            assert error["code"] == code and says in error["message"], (memory, error)
    assert seen(caption("shapes@prod"))[0] == new  # and the server keeps serving


# ---------------------------------------------------------------------------------------------- flows
@pytest.mark.slow
def test_caption_flow_with_a_reference(tagged: tuple[int, int], images: Path, tmp_path: Path) -> None:
    from flows.caption import caption_flow

    old, _ = tagged
    manifest = caption_flow(str(images), "shapes@prod", str(tmp_path / "out"), strategy="pd")
    assert (manifest["bank"], manifest["ref"], manifest["bank_version"]) == ("shapes", "shapes@prod", old)
    rows = [json.loads(line) for line in (tmp_path / "out" / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all({s[0] for s in r["support"]} <= SHAPES for r in rows)
