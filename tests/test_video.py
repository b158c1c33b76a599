"""Video captioning: world videos written and decoded with PyAV, uniform frame sampling, mean frame embeddings
through the CLI, the flow and the server, and corrupt videos skipped."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from corpora.world import make_split
from corpora.world_video import VIDEO_SEED, render_frames, video_file_name, write_video, write_video_set
from decapflow.bank.memory import Registry
from decapflow.caption.captioner import Captioner, Options
from decapflow.caption.files import caption_paths
from decapflow.caption.images import ImageFailure
from decapflow.caption.video import (
    MAX_FRAMES,
    embed_media,
    is_video,
    looks_like_video,
    mean_embedding,
    read_frames,
    sample_indices,
)
from decapflow.cli import main
from decapflow.encoders import load_encoder


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, list(args))
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def world_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two world videos (12 frames of 64x64, mpeg4) with captions.json and scenes.json: written once."""
    return write_video_set(tmp_path_factory.mktemp("world-videos"), 2)


@pytest.fixture
def videos(world_videos: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "videos"
    shutil.copytree(world_videos, folder)
    return folder


def grey_video(path: Path, levels: list[int], codec: str = "mpeg4") -> Path:
    """A video whose frame i is a flat grey of ``levels[i]``: which frames were decoded can be read back."""
    return write_video(path, [Image.new("RGB", (32, 32), (v, v, v)) for v in levels], codec=codec)


def all_frames(path: Path) -> list[Image.Image]:
    """Every frame of ``path``, decoded with PyAV directly (not through decapflow.caption.video)."""
    with av.open(str(path)) as container:
        return [f.to_image() for f in container.decode(video=0)]


def direct_mean(path: Path, frames: int, spec: str) -> np.ndarray:
    """The normalised mean of the per-frame embeddings of the uniformly sampled frames, computed here."""
    decoded = all_frames(path)
    vectors = load_encoder(spec).encode_image([decoded[i] for i in sample_indices(len(decoded), frames)])
    mean = vectors.mean(axis=0)
    return mean / np.linalg.norm(mean)


# ---------------------------------------------------------------------------------------------- the world's videos
def test_world_videos_decode_to_their_rendered_frames(world_videos: Path) -> None:
    data = json.loads((world_videos / "captions.json").read_text())
    assert [im["file_name"] for im in data["images"]] == [video_file_name(1), video_file_name(2)]
    assert sorted({a["image_id"] for a in data["annotations"]}) == [1, 2]
    assert len(data["annotations"]) == 10
    scene, texts = make_split(1, VIDEO_SEED)[0]
    assert [a["caption"] for a in data["annotations"][:5]] == texts
    rendered = render_frames(scene, 12)
    decoded = read_frames(world_videos / video_file_name(1), frames=12)
    assert not isinstance(decoded, ImageFailure)
    assert len(decoded) == 12 and {im.size for im in decoded} == {(64, 64)}
    errors = [np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() for a, b in zip(rendered, decoded, strict=True)]
    assert max(errors) < 8  # lossy (yuv420p chroma), but the same pictures
    assert np.abs(np.asarray(rendered[0], float) - np.asarray(rendered[-1], float)).max() > 50  # the shapes moved


# ---------------------------------------------------------------------------------------------- sampling
def test_sample_indices_are_segment_middles() -> None:
    assert sample_indices(100, 4) == [12, 37, 62, 87]
    assert sample_indices(12, 8) == [0, 2, 3, 5, 6, 8, 9, 11]
    assert sample_indices(12, 1) == [6]
    assert sample_indices(5, 8) == [0, 1, 2, 3, 4]  # a short video: every frame
    with pytest.raises(ValueError):
        sample_indices(10, 0)


@pytest.mark.parametrize("codec", ["mpeg4", "libvpx"])  # MP4 has a frame count in its header; WebM has none
def test_read_frames_decodes_exactly_the_sampled_frames(tmp_path: Path, codec: str) -> None:
    if codec not in av.codecs_available:
        pytest.skip(f"PyAV without {codec}")
    levels = [16 + 16 * i for i in range(12)]
    path = grey_video(tmp_path / ("grey.webm" if codec == "libvpx" else "grey.mp4"), levels, codec)
    picked = read_frames(path, frames=4)
    assert not isinstance(picked, ImageFailure)
    expected = [levels[i] for i in sample_indices(12, 4)]  # frames 1, 4, 7, 10
    assert [round(float(np.asarray(im).mean())) for im in picked] == pytest.approx(expected, abs=3)
    assert len(read_frames(path, frames=50)) == 12  # more asked than there are: every frame once
    with pytest.raises(ValueError):
        read_frames(path, frames=MAX_FRAMES + 1)


def test_unreadable_videos_become_failures(tmp_path: Path, world_videos: Path) -> None:
    good = (world_videos / video_file_name(1)).read_bytes()
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video")
    (tmp_path / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.webm").write_bytes(b"")
    with av.open(str(tmp_path / "sound.wav"), "w") as container:  # a real media file without a video stream
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    shutil.copy(tmp_path / "sound.wav", tmp_path / "sound.mp4")
    reasons = {name: read_frames(tmp_path / name) for name in ("junk.mp4", "truncated.mp4", "empty.webm", "sound.mp4")}
    assert all(isinstance(r, ImageFailure) for r in reasons.values()), reasons
    assert "not a readable video" in reasons["junk.mp4"].reason
    assert "not a readable video" in reasons["truncated.mp4"].reason
    assert reasons["sound.mp4"].reason == "no video stream"
    too_big = read_frames(world_videos / video_file_name(1), max_pixels=64 * 63)
    assert too_big.reason == "64x64 frames exceed the 4,032-pixel limit"


def test_video_detection() -> None:
    assert is_video("a/clip.MP4") and is_video("x.webm") and not is_video("x.png")
    assert looks_like_video(b"\0\0\0\x20ftypisom") and looks_like_video(b"\x1a\x45\xdf\xa3\x01")
    assert looks_like_video(b"RIFF\0\0\0\0AVI LIST") and not looks_like_video(b"\x89PNG\r\n\x1a\n")


def test_mean_embedding_and_embed_media_keep_order(tiny_encoder_spec: str) -> None:
    v = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    assert mean_embedding(v) == pytest.approx(np.array([0.7071068, 0.7071068]))
    with pytest.raises(ValueError):
        mean_embedding(np.array([[1.0, 0.0], [-1.0, 0.0]]))
    encoder = load_encoder(tiny_encoder_spec)
    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")
    video_vector = mean_embedding(encoder.encode_image([red, blue]))
    out = embed_media(encoder, [red, video_vector, blue], batch_size=1)
    direct = encoder.encode_image([red, blue])
    np.testing.assert_allclose(out, np.stack([direct[0], video_vector, direct[1]]), atol=1e-6)


# ---------------------------------------------------------------------------------------------- the CLI
def test_cli_captions_videos_from_the_mean_frame_embedding(own_home: Path, videos: Path, images: Path,
                                                           tiny_encoder_spec: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[np.ndarray] = []
    original = Captioner.caption_embeddings

    def spy(self: Captioner, image_vectors: np.ndarray):
        seen.append(np.array(image_vectors))
        return original(self, image_vectors)

    monkeypatch.setattr(Captioner, "caption_embeddings", spy)
    clip = videos / video_file_name(1)
    out = run("caption", "--memory", "shapes", str(clip), str(images / "img_000007.png"), "--frames", "4")
    lines = [line.split("\t") for line in out.stdout.splitlines()]
    assert [path for path, _ in lines] == [str(clip), str(images / "img_000007.png")]
    assert all(text for _, text in lines)
    (vectors,) = seen  # one batch: the video's mean embedding, then the image's own
    spec = Registry().open("shapes").encoder
    assert spec == tiny_encoder_spec
    np.testing.assert_allclose(vectors[0], direct_mean(clip, 4, spec), atol=1e-5)
    np.testing.assert_allclose(vectors[1], load_encoder(spec).encode_image([Image.open(images / "img_000007.png")
                                                                            .convert("RGB")])[0], atol=1e-6)
    assert not np.allclose(direct_mean(clip, 4, spec), direct_mean(clip, 1, spec), atol=1e-4)  # --frames matters

    seen.clear()
    expected = Captioner.for_bank("shapes", Options(strategy="nnd")).caption_embeddings(
        direct_mean(clip, 8, spec)[None])[0].caption
    nnd = run("caption", "--memory", "shapes", str(clip), "--strategy", "nnd").stdout  # default: 8 frames
    assert nnd == f"{clip}\t{expected}\n"


def test_cli_coco_ids_and_corrupt_videos_skipped(own_home: Path, videos: Path, images: Path) -> None:
    (videos / "video_000042.mp4").write_bytes(b"not a video at all")
    result = run("caption", "--memory", "shapes", str(videos), str(images), "--format", "coco", ok=False)
    assert result.exit_code == 3, result.output
    rows = json.loads(result.stdout)
    assert sorted(r["image_id"] for r in rows) == [1, 2, 7, 8, 9]  # videos 1, 2 (file names) and images 7-9
    assert f"skipped {videos / 'video_000042.mp4'}: not a readable video" in result.stderr


def test_eval_scores_a_folder_of_videos(own_home: Path, videos: Path, tmp_path: Path) -> None:
    out = run("eval", "--annotations", str(videos / "captions.json"), "--images", str(videos), "--memory",
              "shapes", "--no-meteor", "--json", "--output-dir", str(tmp_path / "eval"))
    report = json.loads(out.stdout)
    assert report["images"] == 2 and report["skipped_images"] == []
    assert {"CIDEr", "BLEU-4"} <= set(report["metrics"]["pd"])
    results = json.loads((tmp_path / "eval" / "results_pd.json").read_text())
    assert sorted(r["image_id"] for r in results) == [1, 2]


# ---------------------------------------------------------------------------------------------- flow and server
@pytest.mark.slow  # a temporary Prefect server: ~10-40 s when no other test started one
def test_caption_flow_captions_videos(own_home: Path, videos: Path, tmp_path: Path) -> None:
    from flows.caption import caption_flow

    (videos / "broken.mp4").write_bytes(b"nope")
    manifest = caption_flow(str(videos), "shapes", str(tmp_path / "out"), strategy="nnd", frames=4)
    assert manifest["captioned"] == 2 and manifest["videos"] == 3 and manifest["frames"] == 4
    assert [Path(f["path"]).name for f in manifest["failed"]] == ["broken.mp4"]
    rows = json.loads((tmp_path / "out" / "captions.coco.json").read_text())
    local, _ = caption_paths(Captioner.for_bank("shapes", Options(strategy="nnd")),
                             [videos / video_file_name(1), videos / video_file_name(2)], frames=4)
    assert {r["image_id"]: r["caption"] for r in rows} == {1: local[0].caption, 2: local[1].caption}


def test_server_captions_video_uploads(home: Path, videos: Path, images: Path, serve_app) -> None:
    url = serve_app()
    clip, png = videos / video_file_name(2), images / "img_000008.png"
    local, _ = caption_paths(Captioner.for_bank("shapes", Options(strategy="pd")), [clip, png], frames=4)
    files = [("images", (p.name, p.read_bytes())) for p in (clip, png)]
    answer = httpx.post(f"{url}/v1/captions", data={"memory": "shapes", "frames": "4"}, files=files, timeout=60)
    assert answer.status_code == 200, answer.text
    assert [(r["image"], r["caption"]) for r in answer.json()["results"]] == [(clip.name, local[0].caption),
                                                                             (png.name, local[1].caption)]
    # JSON without a file name: recognised by its first bytes
    body = {"memory": "shapes", "frames": 4, "images": [base64.b64encode(clip.read_bytes()).decode()]}
    sniffed = httpx.post(f"{url}/v1/captions", json=body, timeout=60)
    assert sniffed.status_code == 200 and sniffed.json()["results"][0]["caption"] == local[0].caption
    bad = httpx.post(f"{url}/v1/captions", data={"memory": "shapes"},
                     files=[("images", (png.name, png.read_bytes())), ("images", ("b.mp4", b"junk"))], timeout=60)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_video"
    assert bad.json()["error"]["message"].startswith("image 1 (b.mp4): not a readable video")
    too_many = httpx.post(f"{url}/v1/captions", data={"memory": "shapes", "frames": "65"}, files=files[:1])
    assert too_many.status_code == 422 and too_many.json()["error"]["code"] == "invalid_parameter"


def test_cli_through_the_server_skips_a_corrupt_video(home: Path, videos: Path, serve_app) -> None:
    url = serve_app()
    (videos / "broken.webm").write_bytes(b"\x1a\x45\xdf\xa3 but nothing after")
    result = run("caption", "--server", url, "--memory", "shapes", str(videos), "--frames", "4", ok=False)
    assert result.exit_code == 3, result.output
    local, _ = caption_paths(Captioner.for_bank("shapes"), [videos / video_file_name(1),
                                                            videos / video_file_name(2)], frames=4)
    assert result.stdout == "".join(f"{c.image}\t{c.caption}\n" for c in local)
    assert f"skipped {videos / 'broken.webm'}: " in result.stderr and "not a readable video" in result.stderr
