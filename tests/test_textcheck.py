"""check_text: a corpus that is not text is refused before anything is written; text in any format passes."""

from __future__ import annotations

import gzip
import json
import random
import re
import zlib
from pathlib import Path

import pytest

from decapflow.bank.corpus import CorpusError
from decapflow.bank.textcheck import check_text
from tests.test_corpus import RAW, encode, write


def random_bytes(n: int = 200_000) -> bytes:
    return random.Random(0).randbytes(n)


def png_like() -> bytes:
    """A PNG signature and header chunk, then an IDAT chunk of deflated noise (as real images are)."""
    idat = zlib.compress(random_bytes(60_000))
    return (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00\x00\x00\x01\x00\x08\x02\x00\x00\x00"
            + len(idat).to_bytes(4, "big") + b"IDAT" + idat)


def elf_like() -> bytes:
    """An ELF header, NUL padding, machine code (noise) and a string table, as in an executable."""
    return (b"\x7fELF\x02\x01\x01" + bytes(57) + random_bytes(40_000) + bytes(4096)
            + b"\x00".join([b"main", b"printf", b"__libc_start_main", b".text", b".data"]) * 200)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("random.bin", random_bytes()),
        ("random.txt", random_bytes()),  # a text suffix does not make it text
        ("random.txt.gz", gzip.compress(random_bytes())),  # judged after gunzipping
        ("image.png", png_like()),
        ("program", elf_like()),
        ("captions.jsonl", random_bytes()),
    ],
)
def test_check_text_refuses_binary(tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(CorpusError, match=rf"corpus {re.escape(name)} does not look like text: \d+% of its "
                                          r".* is control characters \(\d+%\) or bytes invalid as UTF-8") as info:
        check_text(path)
    assert "decapflow ingests UTF-8 text (.txt, .jsonl" in str(info.value)
    assert isinstance(info.value, ValueError)  # the CLI shows ValueErrors as one clean line


def test_check_text_refusals_say_what_they_saw(tmp_path: Path) -> None:
    message = str(pytest.raises(CorpusError, check_text, write(tmp_path / "r.bin", random_bytes())).value)
    assert "32% of its 195.3 KB is control characters (11%) or bytes invalid as UTF-8 (21%)" in message
    big = write(tmp_path / "big.bin", random_bytes(3_000_000))
    assert "of the first 1.0 MB" in str(pytest.raises(CorpusError, check_text, big).value)
    utf16 = write(tmp_path / "u.txt", "a dog on the beach\n".encode("utf-16") * 100)
    with pytest.raises(CorpusError, match="UTF-16 byte-order mark: convert it to UTF-8"):
        check_text(utf16)
    gbk = write(tmp_path / "zh.txt", "一只狗在海滩上奔跑。\n".encode("gbk") * 100)
    with pytest.raises(CorpusError, match="text in another encoding, convert it to UTF-8"):
        check_text(gbk)
    parquet = write(tmp_path / "p.txt", encode("parquet", RAW))  # parquet, named as text
    with pytest.raises(CorpusError, match="it is a parquet file: pass fmt='parquet'"):
        check_text(parquet)
    check_text(parquet, fmt="parquet")
    numbers = write(tmp_path / "vectors.txt", "".join(f"{i * 0.37:.4f} {-i}\n" for i in range(100)).encode())
    with pytest.raises(CorpusError, match=r"100 of the 100 non-blank lines in its .* \(100%\) hold no letter"):
        check_text(numbers)
    truncated = tmp_path / "t.txt.gz"
    truncated.write_bytes(gzip.compress(b"a cat\n" * 1000)[:-20])
    with pytest.raises(CorpusError, match="t.txt.gz is a damaged or truncated gzip file"):
        check_text(truncated)
    with pytest.raises(FileNotFoundError):
        check_text(tmp_path / "missing.txt")


LATIN1 = ["L'été dernier, un garçon a mangé une crème brûlée.", "Où est la forêt? À côté du château.",
          "Les élèves étudient près de la fenêtre."] * 40


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("plain.txt", encode("txt", RAW)),
        ("latin1.txt", "\n".join(LATIN1).encode("latin-1")),  # invalid UTF-8, but text
        ("cp1252.txt", "\n".join(LATIN1).replace("'", "\u2019").encode("cp1252")),  # curly quotes are 0x92
        ("cp1251.txt", "Собака бежит по пляжу.\n".encode("cp1251") * 50),
        ("damaged.txt.gz", b"fine\nbad \xff byte\nalso fine\ntrunc \xe2\x82\nend\n"),  # read with U+FFFD
        ("bom.csv", b"\xef\xbb\xbfcaption,id\n" + b"".join(b"a cat number %d,%d\n" % (i, i) for i in range(50))),
        ("few-numbers.txt", b"".join(b"%d\n" % i for i in range(18)) + b"a dog\n"),  # 19 lines: too few to judge
        ("pretty.json", json.dumps({"annotations": [{"id": i, "bbox": [1, 2, 3], "caption": "a dog"}
                                                    for i in range(30)]}, indent=2).encode()),
        ("empty.txt", b""),
    ],
)
def test_check_text_accepts_text(tmp_path: Path, name: str, data: bytes) -> None:
    check_text(write(tmp_path / name, data))


@pytest.mark.parametrize("gz", ["", ".gz"])
@pytest.mark.parametrize("suffix", ["txt", "jsonl", "csv", "tsv", "json", "parquet"])
def test_check_text_accepts_every_format(tmp_path: Path, suffix: str, gz: str) -> None:
    check_text(write(tmp_path / f"corpus.{suffix}{gz}", encode(suffix, RAW)))  # parquet is skipped, not judged


def test_check_text_reads_only_a_sample(tmp_path: Path) -> None:
    """Only the first sample_bytes are judged (default 1 MB): text followed by noise passes, noise first fails."""
    text = b"a red circle next to a blue square\n" * 40_000  # 1.4 MB
    check_text(write(tmp_path / "text-first.txt", text + random_bytes()))
    check_text(write(tmp_path / "text-first.txt.gz", text + random_bytes()))
    with pytest.raises(CorpusError, match="of the first 1.0 KB"):
        check_text(write(tmp_path / "noise-first.txt", random_bytes() + text), sample_bytes=1024)


def test_ingest_refuses_binary_before_creating_a_bank(tmp_path: Path, tiny_encoder_spec: str) -> None:
    from decapflow.bank.ingest import run_ingest
    from decapflow.bank.memory import Registry

    good = write(tmp_path / "good.txt", encode("txt", RAW))
    run_ingest(good, "kept", tiny_encoder_spec)
    before = Registry().open("kept").version
    noise = write(tmp_path / "random.txt", random_bytes())
    for name in ("new", "kept"):  # neither a new bank nor a commit to an existing one
        with pytest.raises(CorpusError, match="random.txt does not look like text"):
            run_ingest(noise, name, tiny_encoder_spec)
    assert Registry().names() == ["kept"] and Registry().open("kept").version == before


def test_cli_ingest_refuses_binary_with_one_clear_line(tmp_path: Path, tiny_encoder_spec: str) -> None:
    from click.testing import CliRunner

    from decapflow.bank.memory import Registry
    from decapflow.cli import main

    noise = write(tmp_path / "random.bin", random_bytes())
    result = CliRunner().invoke(main, ["ingest", str(noise), "--memory", "x", "--encoder", tiny_encoder_spec,
                                       "--prefect", "off"])
    assert result.exit_code == 1
    assert "Error: corpus random.bin does not look like text: 32% of its 195.3 KB" in result.output
    assert "Traceback" not in result.output and Registry().names() == []
