"""Reproduce pipeline, offline parts: the PixMo-Cap loader, URL fetching, step 1 from the cache."""

from __future__ import annotations

import collections
import io
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reproduce.data.pixmo import (
    PIXMO_CAP_REVISION,
    ImageRow,
    ImageSourceError,
    match_captions,
    molmo_split,
    molmo_validation_order,
    pixmo_parquet_files,
    prepare_images,
    read_available,
    read_listing,
    read_manifest,
    read_pixmo_rows,
)
from reproduce.layout import Layout, bank_name, parse_models, run_folder
from reproduce.lens_files import lens_captions
from reproduce.steps.lenses import ImageSource, images_for_run


def _png(color: tuple[int, int, int], size: tuple[int, int] = (20, 16), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


class _Server:
    """A loopback HTTP server answering from a table ``path → (status, body)``; counts hits."""

    def __init__(self, routes: dict[str, tuple[int, bytes]] | None = None, handler=None):
        self.routes = routes or {}
        self.hits: collections.Counter[str] = collections.Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                server.hits[self.path] += 1
                status, body = handler(self.path) if handler else self._route()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _route(self):
                return server.routes.get(self.path, (404, b"not found"))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def online(monkeypatch):
    """Loopback fetches need HF_HUB_OFFLINE unset (conftest sets it)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


# ---------------------------------------------------------------- listings


def test_molmo_validation_order_is_the_datasets_split():
    order = molmo_validation_order(5000)
    assert len(order) == 2048 and len(set(order)) == 2048
    assert order == np.random.default_rng(96817).permutation(5000)[:2048].tolist()
    assert order == molmo_validation_order(5000)  # deterministic
    assert molmo_validation_order(10) == np.random.default_rng(96817).permutation(10).tolist()
    rows = [ImageRow(i, f"u{i}", f"c{i}") for i in range(10)]
    split = molmo_split(rows)
    assert [r.index for r in split] == list(range(10))
    assert [r.source for r in split] == [f"u{j}" for j in molmo_validation_order(10)]


def test_read_listing_jsonl_and_folder(tmp_path: Path):
    (tmp_path / "imgs").mkdir()
    for i in (3, 1, 12):
        (tmp_path / "imgs" / f"{i:05d}.png").write_bytes(_png((i, 0, 0)))
    (tmp_path / "imgs" / "captions.jsonl").write_text(
        json.dumps({"image": "00012.png", "caption": "twelve"}) + "\n"
    )
    rows = read_listing(tmp_path / "imgs")
    assert [r.index for r in rows] == [1, 3, 12] and rows[2].caption == "twelve"
    listing = tmp_path / "list.jsonl"
    listing.write_text(
        "\n".join(
            json.dumps(x)
            for x in (
                {"image": "imgs/00001.png", "caption": "one"},
                {"image_url": "https://example.org/a.jpg", "caption": "url"},
                {"image": str(tmp_path / "imgs" / "00003.png"), "index": 40},
            )
        )
        + "\n\n"
    )
    rows = read_listing(listing)
    assert [r.index for r in rows] == [0, 1, 40]
    assert rows[0].source == str((tmp_path / "imgs" / "00001.png").resolve())
    assert rows[1].source == "https://example.org/a.jpg" and rows[1].caption == "url"
    with pytest.raises(ImageSourceError, match="does not exist"):
        read_listing(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"caption": "no image"}\n')
    with pytest.raises(ImageSourceError, match="no 'image'"):
        read_listing(tmp_path / "bad.jsonl")


# ---------------------------------------------------------------- fetching


def test_prepare_images_fetches_skips_failures_and_caches(tmp_path: Path, online):
    routes = {
        "/a.jpg": (200, _png((255, 0, 0), fmt="JPEG")),
        "/b.png": (200, _png((0, 255, 0))),
        "/gone.jpg": (404, b"no"),
        "/broken.jpg": (200, b"\xff\xd8\xff\xe0 definitely not a whole jpeg"),
        "/c.gif": (200, _png((0, 0, 255), fmt="GIF")),
        "/d.png": (200, _png((9, 9, 9))),
    }
    with _Server(routes) as server:
        rows = [
            ImageRow(i, f"{server.url}/{name}", f"caption {i}")
            for i, name in enumerate(["a.jpg", "gone.jpg", "b.png", "broken.jpg", "c.gif", "d.png"])
        ]
        out, cache = tmp_path / "images", tmp_path / "cache"
        records = prepare_images(rows, out, 3, cache_dir=cache, source_name="test")
        assert [r.index for r in records] == [0, 2, 4]  # 1 (404) and 3 (broken) skipped
        assert [Path(r.path).name for r in records] == ["00000.jpg", "00002.png", "00004.png"]
        assert Image.open(records[2].path).format == "PNG"  # the GIF was re-encoded
        assert server.hits["/d.png"] == 0  # enough images before it
        manifest = json.loads((out / "manifest.json").read_text())
        assert [f["index"] for f in manifest["failed"]] == [1, 3]
        assert "404" in manifest["failed"][0]["error"]
        assert read_manifest(out) == records

        # Again: nothing fetched anew, failures not retried, same selection.
        hits = dict(server.hits)
        assert prepare_images(rows, out, 3, cache_dir=cache, source_name="test") == records
        assert dict(server.hits) == hits
        # From the URL cache into a fresh folder: no fetch either.
        again = prepare_images(rows, tmp_path / "other", 3, cache_dir=cache, retry_failed=True)
        assert [r.index for r in again] == [0, 2, 4]
        assert server.hits["/a.jpg"] == 1 and server.hits["/gone.jpg"] == 2
        # More images than loadable: all that load, in order.
        more = prepare_images(rows, out, 10, cache_dir=cache)
        assert [r.index for r in more] == [0, 2, 4, 5]


def test_prepare_images_from_a_local_folder_keeps_bytes(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    data = _png((1, 2, 3), fmt="JPEG")
    (src / "7.jpg").write_bytes(data)
    (src / "9.png").write_bytes(b"garbage")
    records = prepare_images(read_listing(src), tmp_path / "out", 5)
    assert [r.index for r in records] == [7]
    assert Path(records[0].path).read_bytes() == data


N_TRAIN = 3000


def pixmo_hub_cache(
    root: Path, revision: str = PIXMO_CAP_REVISION, shards: int = 3, url: str = "http://img"
) -> Path:
    """PixMo-Cap's parquet files, N_TRAIN rows in ``shards`` files, in the Hub-cache layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = root / "datasets--allenai--pixmo-cap"
    data = repo / "snapshots" / revision / "data"
    data.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    bounds = np.linspace(0, N_TRAIN, shards + 1).astype(int)
    for k in range(shards):
        rows = range(bounds[k], bounds[k + 1])
        table = pa.table(
            {
                "image_url": [f"{url}/{j}.jpg" for j in rows],
                "caption": [f"caption {j}" for j in rows],
                "transcripts": [[f"t{j}"] for j in rows],
            }
        )
        pq.write_table(table, data / f"train-{k:05d}-of-{shards:05d}.parquet")
    return root


def test_pixmo_parquet_from_the_hub_cache_offline_and_molmo_split_on_a_listing(tmp_path: Path):
    hub = pixmo_hub_cache(tmp_path / "hub")
    files = pixmo_parquet_files(hub_cache=hub, offline=True)
    assert [f.name for f in files] == [f"train-{k:05d}-of-00003.parquet" for k in range(3)]
    rows = read_pixmo_rows(files)
    assert len(rows) == N_TRAIN and rows[1234] == ImageRow(
        1234, "http://img/1234.jpg", "caption 1234"
    )
    # a pinned commit in the cache is enough even when HF_HUB_OFFLINE is not set
    assert pixmo_parquet_files(hub_cache=hub, offline=False) == files
    with pytest.raises(ImageSourceError, match="not in the Hub cache"):
        pixmo_parquet_files(hub_cache=hub, revision="0" * 40, offline=True)

    # Molmo dropped the rows whose image failed, THEN split: here every 7th row failed
    kept = [r for r in rows if r.index % 7]
    perm = np.random.default_rng(96817).permutation(len(kept))[:2048]
    want = [kept[j].source for j in perm]
    urls = tmp_path / "available.txt"
    urls.write_text("\n".join(r.source for r in kept) + "\n")
    indices = tmp_path / "available_idx.txt"
    indices.write_text("\n".join(str(r.index) for r in kept))
    for listing in (urls, indices):
        split = molmo_split(rows, read_available(listing))
        assert [r.index for r in split] == list(range(2048))
        assert [r.source for r in split] == want
    # the unfiltered split is another selection altogether
    naive = [r.source for r in molmo_split(rows)]
    assert len(set(naive) & set(want)) < 1800
    with pytest.raises(ImageSourceError, match="does not exist"):
        read_available(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ImageSourceError, match="one image URL"):
        read_available(tmp_path / "empty.txt")


def _authors_lens_dir(path: Path, captions: list[str]) -> Path:
    path.mkdir(parents=True)
    results = [
        {
            "image_idx": i,
            "ground_truth_caption": c,
            "chunks": [
                {
                    "chunk_name": "Full Image",
                    "patches": [
                        {"patch_idx": 0, "patch_row": 0, "patch_col": 0, "top_predictions": []}
                    ],
                }
            ],
        }
        for i, c in enumerate(captions)
    ]
    for layer in (0, 8):
        doc = {"layer_idx": layer, "top_k": 5, "results": results}
        (path / f"logit_lens_layer{layer}_topk5_multi-gpu.json").write_text(json.dumps(doc))
    return path


def test_match_captions_recovers_the_authors_images(tmp_path: Path):
    rows = read_pixmo_rows(
        pixmo_parquet_files(hub_cache=pixmo_hub_cache(tmp_path / "hub"), offline=True)
    )
    theirs = [2999, 17, 1500, 4]  # the authors' validation images, by train row
    lens_dir = _authors_lens_dir(tmp_path / "theirs", [f"caption {j}" for j in theirs])
    matched = match_captions(rows, lens_captions(lens_dir))
    assert [(r.index, r.source) for r in matched] == [
        (i, f"http://img/{j}.jpg") for i, j in enumerate(theirs)
    ]
    bad = _authors_lens_dir(tmp_path / "bad", ["caption 3", "no such caption"])
    with pytest.raises(ImageSourceError, match="match no PixMo-Cap train row"):
        match_captions(rows, lens_captions(bad))
    twice = rows + [ImageRow(N_TRAIN, "http://img/other.jpg", "caption 3")]
    with pytest.raises(ImageSourceError, match="different images"):
        match_captions(twice, {0: "caption 3"})


def test_step3_images_come_from_the_parquet_listing(tmp_path: Path, online):
    layout = Layout(tmp_path / "run")
    with _Server(handler=lambda path: (200, _png((int(path[1:-4]) % 256, 0, 0)))) as server:
        hub = pixmo_hub_cache(tmp_path / "hub", url=server.url)
        split = molmo_split(read_pixmo_rows(pixmo_parquet_files(hub_cache=hub, offline=True)))
        records = images_for_run(
            layout, ImageSource("pixmo-cap"), 3, cache_dir=tmp_path / "imgcache", hub_cache=hub
        )
        assert sorted(server.hits) == sorted(
            urllib.parse.urlsplit(r.source).path for r in split[:3]
        )
    assert [(r.index, r.caption) for r in records] == [(i, split[i].caption) for i in range(3)]
    manifest = json.loads((layout.images / "manifest.json").read_text())
    assert manifest["source"] == "pixmo-cap@fd3f09ba9ed0 (molmo split)"


# ---------------------------------------------------------------- layout, step 1


def test_names_and_layout(tmp_path: Path):
    assert parse_models(None)[-1] == "qwen2vl" and len(parse_models("all")) == 10
    assert parse_models("olmo-vit, qwen2vl,olmo-vit") == ["olmo-vit", "qwen2vl"]
    with pytest.raises(ValueError, match="unknown model"):
        parse_models("olmo-clip")
    assert [bank_name(m) for m in ("olmo-dino", "llama-vit", "qwen-siglip", "qwen2vl")] == [
        "olmo",
        "llama",
        "qwen",
        "qwen2vl",
    ]
    layout = Layout.at(tmp_path)
    assert run_folder("olmo-vit") == "checkpoints_olmo-vit"
    assert layout.lens_dir("logitlens", "qwen2vl") == tmp_path / "lenses" / "logit_lens" / "qwen2vl"
    assert layout.eval_dir("latentlens", "olmo-vit") == tmp_path / "eval/latentlens/olmo-vit"


def _cached_repo(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    """A Hugging Face cache entry as `hf_hub_download` leaves it (offline reads it)."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    for name, data in files.items():
        path = folder / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_step1_downloads_only_what_is_asked_from_the_offline_cache(tmp_path: Path):
    from latentlens.index import ContextualIndex
    from molmo.checkpoint import read_checkpoint
    from molmo.testing import synthetic_connector, tiny_config
    from reproduce.steps.download import download

    cache = tmp_path / "hf"
    state = synthetic_connector(tiny_config("olmo-vit"))
    buf = io.BytesIO()
    torch.save(state, buf)
    _cached_repo(
        cache, "McGill-NLP/latentlens-connectors", {"olmo-vit/connector.pt": buf.getvalue()}
    )
    bank = tmp_path / "bank"
    meta = [{"token_str": " a", "token_id": 5, "caption": "a cat", "position": 1}] * 3
    ContextualIndex.from_tensors(
        {1: torch.randn(3, 8), 2: torch.randn(3, 8), 4: torch.randn(3, 8)}, meta
    ).save(bank)
    _cached_repo(
        cache,
        "McGill-NLP/latentlens-qwen2vl-embeddings",
        {f.name: f.read_bytes() for f in bank.iterdir() if f.name != "layer_02.safetensors"},
    )  # layer 2 is not in the cache: fetching it would need the network
    layout = Layout.at(tmp_path / "run")
    record = download(layout, ["olmo-vit", "qwen2vl"], bank_layers=[1, 4], cache_dir=cache)
    assert not record["skipped"]
    path = Path(record["files"]["connector:olmo-vit"])
    assert set(read_checkpoint(path)) == set(state)
    snapshot = Path(record["files"]["bank:McGill-NLP/latentlens-qwen2vl-embeddings"])
    index = ContextualIndex.from_directory(snapshot, layers=[1, 4])
    assert index.available_layers == [1, 4] and len(index.entries) == 3
    again = download(layout, ["olmo-vit", "qwen2vl"], bank_layers=[1, 4], cache_dir=cache)
    assert again["skipped"]
    for models, layers in ((["llama-vit"], None), (["qwen2vl"], None)):
        with pytest.raises(Exception, match="(?i)offline|cache|not found|connect"):
            download(layout, models, bank_layers=layers, cache_dir=cache)  # not cached


def test_vg_phrases(tmp_path: Path):
    from reproduce.steps.banks import vg_phrases

    src = tmp_path / "region_descriptions.json"
    src.write_text(
        json.dumps(
            [
                {"id": 1, "regions": [{"phrase": "a man  riding\na horse"}, {"phrase": " "}]},
                {"id": 2, "regions": [{"phrase": "white clouds"}, {"phrase": "white clouds"}]},
            ]
        )
    )
    assert vg_phrases(src, tmp_path / "vg.txt") == 3
    assert (tmp_path / "vg.txt").read_text().splitlines() == [
        "a man riding a horse",
        "white clouds",
        "white clouds",
    ]
