"""Curating a bank on a real LanceDB store in a temp dir: history, remove (dry run, by file, source, pattern,
filter, all), restore equality, tags, clones sharing files, purge checked by reading the bytes, stale decoders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from decapflow.bank.history import history
from decapflow.bank.ingest import run_ingest
from decapflow.bank.memory import Registry
from decapflow.cli import main
from tests.conftest import SENTENCES

UNIQUE = "a violet hexagon owned by zqxjmailbox at example dot org"


def run(*args: str, ok: bool = True, input: str | None = None):
    result = CliRunner().invoke(main, list(args), input=input)
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture
def fed(tmp_path: Path, tiny_encoder_spec: str) -> dict[str, Path]:
    """Bank 'feed' fed by three files: the 8 shape sentences, a night's feed, and a file with one personal line."""
    files = {"base": write(tmp_path / "base.txt", SENTENCES),
             "night": write(tmp_path / "night-07.txt", [f"{n} small grey dots in a row" for n in
                                                         ("two", "three", "four", "five")]),
             "bad": write(tmp_path / "bad.txt", [UNIQUE, "a red circle"])}
    for path in files.values():
        run_ingest(path, "feed", tiny_encoder_spec, chunk_size=3)
    return files


def texts(bank_ref: str = "feed") -> list[str]:
    return sorted(Registry().open(bank_ref).arrays()[0])


def test_history_says_what_made_each_version(fed: dict[str, Path]) -> None:
    entries = history(None, "feed")
    assert [e["op"] for e in entries] == ["create", "ingest", "ingest", "ingest"]
    base = entries[1]
    assert base["source"] == "base.txt" and base["content_hash"].startswith("sha256:")
    assert (base["rows_added"], base["commits"], base["version_from"], base["version"]) == (8, 3, 2, 4)
    assert entries[-1]["rows_added"] == 1 and entries[-1]["rows"] == 13  # "a red circle" was stored already
    assert all(e["user"] and e["host"] for e in entries)
    out = run("memory", "history", "feed").output.splitlines()
    assert len(out) == 4 and "from base.txt sha256:" in out[1] and "v2-v4" in out[1] and "+8" in out[1]
    assert json.loads(run("memory", "history", "feed", "--json", "--limit", "1").output)[0]["source"] == "bad.txt"


def test_dry_run_counts_and_samples_and_changes_nothing(fed: dict[str, Path]) -> None:
    before = Registry().open("feed").version
    out = run("memory", "remove", "feed", "--match", "grey dots", "--dry-run").output
    assert "4 row(s) match" in out and "dry run" in out and "small grey dots" in out
    assert Registry().open("feed").version == before and len(texts()) == 13


def test_remove_by_file_matches_after_the_same_cleaning_as_ingest(fed: dict[str, Path], tmp_path: Path) -> None:
    spaced = write(tmp_path / "again.txt", ["  a   violet hexagon owned by zqxjmailbox at example dot org\t"])
    report = json.loads(run("memory", "remove", "feed", "--file", str(spaced), "--json").output)
    assert report["removed"] == 1 and report["rows"] == 12 and UNIQUE not in texts()
    entry = history(None, "feed")[-1]
    assert entry["op"] == "remove" and entry["rows_removed"] == 1 and entry["source"] == "again.txt"
    assert entry["details"]["criteria"] == {"file": "again.txt"} and entry["content_hash"].startswith("sha256:")


def test_remove_by_source_pattern_and_filter(fed: dict[str, Path]) -> None:
    assert json.loads(run("memory", "remove", "feed", "--source", "night-07.txt", "--json").output)["removed"] == 4
    assert not [t for t in texts() if "grey" in t]
    assert json.loads(run("memory", "remove", "feed", "--match", "(?i)^TWO ", "--json").output)["removed"] == 2
    got = json.loads(run("memory", "remove", "feed", "--where", "text LIKE '%circle%' AND source = 'base.txt'",
                         "--json").output)
    assert got["removed"] == 3 and not [t for t in texts() if "circle" in t]


def test_bad_removals_change_nothing(fed: dict[str, Path]) -> None:
    before = Registry().open("feed").version
    out = run("memory", "remove", "feed", "--where", "colour = 'red'", ok=False)
    assert out.exit_code == 1 and "does not parse or names an unknown column" in out.output
    out = run("memory", "remove", "feed", "--match", "(unclosed", ok=False)
    assert out.exit_code == 1 and "does not parse" in out.output
    out = run("memory", "remove", "feed", "--match", ".", ok=False)
    assert out.exit_code == 1 and "add --all" in out.output
    assert "no row matches" in run("memory", "remove", "feed", "--match", "purple elephants").output
    assert run("memory", "remove", "feed", ok=False).exit_code == 2  # no criterion
    out = run("memory", "remove", "nope", "--all", ok=False)
    assert out.exit_code == 1 and "no memory bank named 'nope'" in out.output and "feed" in out.output
    out = run("ingest", str(fed["base"]), "--memory", "feed@prod", "--prefect", "off", ok=False)
    assert out.exit_code == 1 and "pins a version" in out.output
    assert Registry().open("feed").version == before
    assert json.loads(run("memory", "remove", "feed", "--all", "--json").output)["rows"] == 0


def test_restore_gives_back_exactly_that_version_row_by_row(fed: dict[str, Path]) -> None:
    bank = Registry().open("feed")
    target = bank.version

    def rows(ref: str) -> dict[str, tuple[str, bytes]]:
        table = Registry().open(ref).table.search().select(["hash", "text", "vector"]).limit(None).to_arrow()
        return {h: (t, np.asarray(v, np.float32).tobytes()) for h, t, v in
                zip(*(table.column(c).to_pylist() for c in ("hash", "text", "vector")), strict=True)}

    expected = rows(f"feed@v{target}")
    run("memory", "remove", "feed", "--source", "base.txt")
    run("memory", "remove", "feed", "--match", "grey")
    out = run("memory", "restore", "feed", "--version", str(target)).output
    assert f"restored version {target} as version {target + 3}" in out and "12 back" in out
    assert rows("feed") == expected
    entry = history(None, "feed")[-1]
    assert (entry["op"], entry["details"]["restored"], entry["rows_added"]) == ("restore", target, 12)
    bad = run("memory", "restore", "feed", "--version", "999", ok=False)
    assert bad.exit_code == 1 and "has no version 999" in bad.output and "versions kept: 1-" in bad.output
    assert run("memory", "restore", "feed", ok=False).exit_code == 1  # neither --version nor --tag


def test_tags_pin_move_list_delete_and_refuse_bad_names(fed: dict[str, Path]) -> None:
    version = Registry().open("feed").version
    assert "tag 'prod' pins version" in run("memory", "tag", "feed", "prod").output
    run("memory", "remove", "feed", "--source", "night-07.txt")
    assert len(texts("feed@prod")) == 13 and len(texts("feed")) == 9
    assert "moved from version" in run("memory", "tag", "feed", "prod", "--version", str(version + 1)).output
    listed = json.loads(run("memory", "tag", "feed", "--list", "--json").output)
    assert listed == [{"tag": "prod", "version": version + 1, "rows": 9}]
    run("memory", "restore", "feed", "--tag", "prod", ok=False)  # the newest already: nothing to restore
    for bad in ("v12", "2prod", "a b", "_clone-x"):
        out = run("memory", "tag", "feed", bad, ok=False)
        assert out.exit_code != 0 and "invalid tag" in out.output
    out = run("caption", "--memory", "feed@nope", str(fed["base"]), ok=False)
    assert out.exit_code == 1 and "has no tag 'nope'" in out.output and "prod (v" in out.output
    assert "deleted tag 'prod'" in run("memory", "tag", "feed", "prod", "--delete").output
    assert [e["details"]["action"] for e in history(None, "feed") if e["op"] == "tag"] == [
        "created", "moved", "deleted"]


def test_clone_shares_files_evolves_apart_and_pins_its_source(own_home: Path) -> None:
    from decapflow.decoder.registry import decoders

    source_folder = own_home / "banks" / "shapes.lance"
    out = run("memory", "clone", "shapes", "trial").output
    assert "cloned from 'shapes'" in out and "8 rows, files shared" in out
    clone_folder = own_home / "banks" / "trial.lance"
    assert not list(clone_folder.rglob("*.lance")) and list(source_folder.glob("data/*.lance"))  # no data copied
    assert texts("trial") == sorted(SENTENCES)
    assert decoders().current_id("trial") == decoders().current_id("shapes")  # it captions at once
    run("memory", "remove", "trial", "--match", "circle")
    assert len(texts("trial")) == 5 and len(texts("shapes")) == 8  # apart from here on
    out = run("memory", "rm", "shapes", "--yes", ok=False)
    assert out.exit_code == 1 and "shallow clones" in out.output and "trial" in out.output
    assert "_clone-trial" in Registry().open("shapes").tags()
    run("memory", "rm", "trial", "--yes")
    assert Registry().open("shapes").tags() == {}  # the pin went with the clone
    assert history(None, "trial", current=False)[-1]["op"] == "delete"


def test_purge_erases_the_text_from_every_file_and_flags_the_decoder(own_home: Path, tmp_path: Path,
                                                                       tiny_encoder_spec: str) -> None:
    run_ingest(write(tmp_path / "leak.txt", [UNIQUE]), "shapes", tiny_encoder_spec)
    from decapflow.lifecycle.training import train_from_bank

    train_from_bank("shapes", config="tiny", recipe=__import__("decapflow.decoder.train", fromlist=["x"]).TrainRecipe(
        epochs=1, max_steps=2, batch_size=4, val_fraction=0.0), progress=False)
    Registry().open("shapes").vector_cache()  # a local copy holding the sentence
    run("memory", "tag", "shapes", "before-purge")
    secret = UNIQUE.encode()

    def files_holding() -> list[Path]:
        return [p for p in own_home.rglob("*") if p.is_file() and secret in p.read_bytes()]

    assert any("shapes.lance" in str(p) for p in files_holding())  # the check can fail: the bytes are there
    out = run("memory", "remove", "shapes", "--match", "zqxjmailbox", "--purge", "--yes", ok=False)
    assert out.exit_code == 1 and "before-purge" in out.output and "--drop-tags" in out.output
    assert files_holding()  # refused: nothing changed
    out = run("memory", "remove", "shapes", "--match", "zqxjmailbox", "--purge", "--drop-tags", "--yes").output
    assert "purged:" in out and "tags dropped: before-purge" in out
    assert files_holding() == []
    assert UNIQUE not in texts("shapes") and len(texts("shapes")) == 8
    listed = json.loads(run("decoder", "list", "shapes", "--json").output)
    assert [d["stale_rows"] for d in listed if d["current"]] == [1]
    assert "trained on 1 rows since removed" in run("decoder", "list", "shapes").output
    entry = [e for e in history(None, "shapes") if e["op"] == "remove"][-1]
    assert entry["details"]["criteria"] == {"match": "<redacted by purge>"}
    assert not any(UNIQUE in json.dumps(e) for e in history(None, "shapes"))


def test_removal_marks_decoders_and_makes_a_retrain_due(own_home: Path) -> None:
    from decapflow.decoder.registry import decoders
    from decapflow.lifecycle.training import retrain_due

    current = decoders().current_id("shapes")
    assert retrain_due("shapes", min_new_rows=1000)[0] is False
    run("memory", "remove", "shapes", "--match", "circle")
    due, reason = retrain_due("shapes", min_new_rows=1000)
    assert due and f"decoder {current} was trained on 3 rows since removed" in reason
    run("memory", "restore", "shapes", "--version", "2")  # back to the version it learnt: nothing stale
    assert json.loads(run("decoder", "list", "shapes", "--json").output)[0]["stale_rows"] == 0


def test_a_running_server_stops_returning_a_removed_sentence(own_home: Path, serve_app, images: Path) -> None:
    import httpx

    url = serve_app()

    def seen() -> set[str]:
        found = {h["text"] for h in httpx.get(f"{url}/v1/banks/shapes/search", params={"q": "a red circle",
                                                                                        "k": 8}).json()}
        with open(images / "img_000007.png", "rb") as image:
            answer = httpx.post(f"{url}/v1/captions", data={"memory": "shapes", "strategy": "pd", "n_support": 8},
                                files={"images": image}, timeout=60).json()
        return found | {s["text"] for r in answer["results"] for s in r["support"]}

    assert "a red circle" in seen()
    run("memory", "remove", "shapes", "--match", "^a red circle$")
    assert "a red circle" not in seen() and "three red squares" in seen()
