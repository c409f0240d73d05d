"""The three lenses over a tiny molmo model: the original release's JSON files (SPEC §8)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from latentlens.index import ContextualIndex
from latentlens.lenses import EmbeddingLens, LogitLens
from molmo import MolmoModel
from molmo.testing import synthetic_connector, tiny_config, tiny_vit
from reproduce.lens_files import (
    LENS_DIRS,
    default_run_name,
    embeddinglens_filename,
    latentlens_filename,
    logitlens_filename,
    run_lenses,
)
from tests.tiny import tiny_causal_lm, tiny_tokenizer

TOP_K = 3
LAYERS = [0, 1, 3]


def _array_of(item: dict, n: int | None = None) -> dict:
    schema: dict = {"type": "array", "items": item}
    if n is not None:
        schema.update(minItems=n, maxItems=n)
    return schema


def _obj(**props: dict) -> dict:
    return {"type": "object", "required": list(props), "properties": props}


INT, NUM, STR = {"type": "integer"}, {"type": "number"}, {"type": "string"}


def _image_schema(patch_fields: dict, grid: int) -> dict:
    patch = _obj(patch_idx=INT, patch_row=INT, patch_col=INT, **patch_fields)
    chunk = _obj(chunk_name=STR, patches=_array_of(patch, grid * grid))
    return _obj(image_idx=INT, ground_truth_caption=STR, chunks=_array_of(chunk, 1))


def latent_schema(grid: int) -> dict:
    neighbor = _obj(
        token_str=STR, token_id=INT, caption=STR, position=INT, similarity=NUM, contextual_layer=INT
    )
    image = _image_schema({"nearest_contextual_neighbors": _array_of(neighbor, TOP_K)}, grid)
    return _obj(
        checkpoint=STR,
        contextual_dir=STR,
        visual_layer=INT,
        contextual_layers_used=_array_of(INT),
        split=STR,
        num_images=INT,
        image_indices=_array_of(INT),
        top_k=INT,
        processing_time_seconds=NUM,
        results=_array_of(image),
    )


def logit_schema(grid: int) -> dict:
    pred = _obj(token=STR, token_id=INT, logit=NUM)
    image = _image_schema({"top_predictions": _array_of(pred, TOP_K)}, grid)
    return _obj(
        checkpoint=STR,
        split=STR,
        num_images=INT,
        num_processes=INT,
        top_k=INT,
        layer_idx=INT,
        results=_array_of(image),
    )


def embedding_schema(grid: int) -> dict:
    nn_ = _obj(token=STR, similarity=NUM)
    image = _image_schema({"nearest_neighbors": _array_of(nn_, TOP_K)}, grid)
    split = _obj(num_images=INT, images=_array_of(image), statistics={"type": "object"})
    return _obj(
        checkpoint=STR,
        prompt=STR,
        dataset=STR,
        num_processes=INT,
        llm_layer=INT,
        splits=_obj(train=split, validation=split),
        overall_statistics={"type": "object"},
    )


def build(name: str) -> MolmoModel:
    cfg = tiny_config(name)
    family = {"olmo": "olmo2", "llama": "llama", "qwen2": "qwen2"}[cfg.llm.family]
    return MolmoModel.from_components(
        cfg, tiny_causal_lm(family), tiny_tokenizer(), tiny_vit(cfg), synthetic_connector(cfg)
    )


def tiny_index(d: int = 32, n: int = 40) -> ContextualIndex:
    g = torch.Generator().manual_seed(7)
    meta = [
        {
            "token_str": f" w{i}",
            "token_id": 10 + i,
            "caption": f"caption w{i}",
            "position": i % 5,
            "char_span": [8, 9 + len(str(i))],  # "w{i}" in "caption w{i}"
        }
        for i in range(n)
    ]
    layers = {1: torch.randn(n, d, generator=g), 2: torch.randn(n, d, generator=g)}
    return ContextualIndex.from_tensors(layers, meta, dtype=torch.float32)


def images() -> list[np.ndarray]:
    rs = np.random.RandomState(0)
    return [
        rs.randint(0, 256, (h, w, 3)).astype(np.uint8) for h, w in ((20, 42), (42, 42), (30, 17))
    ]


@pytest.fixture(scope="module")
def olmo_run(tmp_path_factory):
    model = build("olmo-vit")
    index = tiny_index()
    out = tmp_path_factory.mktemp("lens")
    written = run_lenses(
        model,
        images(),
        out,
        layers=LAYERS,
        index=index,
        top_k=TOP_K,
        image_indices=[5, 6, 9],
        captions=["a", "b", "c"],
        batch_size=2,
        progress=False,
    )
    return model, index, out, written


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_files_names_and_folders(olmo_run):
    model, _, out, written = olmo_run
    run = "checkpoints_olmo-vit"
    assert default_run_name(model) == run
    assert written["latentlens"] == [
        out / LENS_DIRS["latentlens"] / run / latentlens_filename(x) for x in LAYERS
    ]
    assert [p.name for p in written["logitlens"]] == [
        f"logit_lens_layer{x}_topk{TOP_K}_multi-gpu.json" for x in LAYERS
    ]
    assert [p.name for p in written["embeddinglens"]] == [
        f"nearest_neighbors_analysis_pixmo_cap_multi-gpu_layer{x}.json" for x in LAYERS
    ]
    assert latentlens_filename(8) == "contextual_neighbors_visual8_allLayers.json"
    assert logitlens_filename(8, 5) == "logit_lens_layer8_topk5_multi-gpu.json"
    assert embeddinglens_filename(8) == "nearest_neighbors_analysis_pixmo_cap_multi-gpu_layer8.json"
    assert all(p.is_file() for paths in written.values() for p in paths)


def test_json_validates_against_the_schemas(olmo_run):
    model, _, _, written = olmo_run
    g = model.grid
    for lens, schema in (
        ("latentlens", latent_schema(g)),
        ("logitlens", logit_schema(g)),
        ("embeddinglens", embedding_schema(g)),
    ):
        for layer, path in zip(LAYERS, written[lens], strict=True):
            doc = _load(path)
            jsonschema.validate(doc, schema)
            images_ = (
                doc["splits"]["validation"]["images"] if lens == "embeddinglens" else doc["results"]
            )
            assert [im["image_idx"] for im in images_] == [5, 6, 9]
            assert [im["ground_truth_caption"] for im in images_] == ["a", "b", "c"]
            patches = images_[0]["chunks"][0]["patches"]
            assert [(p["patch_row"], p["patch_col"]) for p in patches] == [
                (r, c) for r in range(g) for c in range(g)
            ]
            key = {
                "latentlens": "visual_layer",
                "logitlens": "layer_idx",
                "embeddinglens": "llm_layer",
            }
            assert doc[key[lens]] == layer


def test_contents_are_the_lenses_on_the_right_states(olmo_run):
    model, index, _, written = olmo_run
    states = model.encode(images()[2:], LAYERS)
    for layer, path in zip(LAYERS, written["latentlens"], strict=True):
        doc = _load(path)
        assert doc["contextual_layers_used"] == [1, 2] and doc["top_k"] == TOP_K
        got = doc["results"][2]["chunks"][0]["patches"][4]["nearest_contextual_neighbors"]
        want = index.search(states.layer(layer, "connector")[0, 4], top_k=TOP_K)[0]
        assert [(n["token_id"], n["contextual_layer"], n["caption"]) for n in got] == [
            (w.token_id, w.contextual_layer, w.caption) for w in want
        ]
        assert [n["similarity"] for n in got] == pytest.approx([w.similarity for w in want])
        # each neighbour says where its occurrence of the token sits in its caption
        assert all(n["char_span"] == list(w.char_span) for n, w in zip(got, want, strict=True))
        assert all(n["caption"][slice(*n["char_span"])] == n["token_str"].strip() for n in got)
    logit = LogitLens(model.llm, model.tokenizer, top_k=TOP_K)
    emb = EmbeddingLens(model.llm, model.tokenizer, top_k=TOP_K)
    doc0 = _load(written["logitlens"][0])["results"][2]["chunks"][0]["patches"][4]
    want0 = logit.predict(states.layer(0, "hidden")[0, 4:5])[0]  # layer 0 = hidden_states[0]
    assert [p["token_id"] for p in doc0["top_predictions"]] == [p.token_id for p in want0]
    edoc = _load(written["embeddinglens"][0])["splits"]["validation"]["images"][2]
    got_e = edoc["chunks"][0]["patches"][4]["nearest_neighbors"]
    want_e = emb.predict(states.layer(0, "connector")[0, 4:5])[0]  # layer 0 = connector output
    assert [n["token"] for n in got_e] == [p.token_str for p in want_e]


def _split_scores(results: list[dict], key: str, score: str) -> tuple[list, list[float]]:
    """(everything but the scores, the scores) of a results list."""
    rest, scores = [], []
    for image in results:
        for patch in image["chunks"][0]["patches"]:
            for item in patch[key]:
                scores.append(item[score])
                rest.append({k: v for k, v in item.items() if k != score})
    return rest, scores


def test_batching_does_not_change_results(olmo_run, tmp_path):
    model, index, _, written = olmo_run
    again = run_lenses(
        model,
        images(),
        tmp_path,
        layers=[1],
        index=index,
        top_k=TOP_K,
        batch_size=1,
        image_indices=[5, 6, 9],
        captions=["a", "b", "c"],
        lenses=("latentlens", "logitlens"),
        progress=False,
    )
    for lens, key, score in (
        ("latentlens", "nearest_contextual_neighbors", "similarity"),
        ("logitlens", "top_predictions", "logit"),
    ):
        a = _split_scores(_load(again[lens][0])["results"], key, score)
        b = _split_scores(_load(written[lens][1])["results"], key, score)
        assert a[0] == b[0]  # same tokens, captions, layers (batched BLAS differs in the last bits)
        assert a[1] == pytest.approx(b[1], abs=1e-5)


def test_run_name_from_a_local_checkpoint_and_skip_existing(tmp_path):
    model = build("qwen-siglip")
    model.checkpoint_path = tmp_path / "ckpts" / "qwen-siglip" / "connector.pt"
    assert default_run_name(model) == "ckpts_qwen-siglip"
    first = run_lenses(
        model,
        images()[:1],
        tmp_path / "out",
        layers=[0, 2],
        lenses=("embeddinglens",),
        top_k=TOP_K,
        progress=False,
        embedding_original=True,
    )
    assert [p.parent.name for p in first["embeddinglens"]] == ["ckpts_qwen-siglip"] * 2
    doc = _load(first["embeddinglens"][1])
    jsonschema.validate(doc, embedding_schema(model.grid))
    assert doc["checkpoint"].endswith("connector.pt")
    again = run_lenses(
        model,
        images()[:1],
        tmp_path / "out",
        layers=[0, 2],
        lenses=("embeddinglens",),
        top_k=TOP_K,
        progress=False,
        skip_existing=True,
    )
    assert again == {"embeddinglens": []}


def test_bad_arguments():
    model = build("llama-vit")
    with pytest.raises(ValueError, match="needs a contextual bank"):
        run_lenses(model, images()[:1], "unused", lenses=("latentlens",), progress=False)
    with pytest.raises(ValueError, match="bank width"):
        run_lenses(
            model,
            images()[:1],
            "unused",
            lenses=("latentlens",),
            index=tiny_index(d=8),
            progress=False,
        )
    with pytest.raises(ValueError, match="unknown lens"):
        run_lenses(model, images()[:1], "unused", lenses=("tunedlens",), progress=False)
    with pytest.raises(ValueError, match="captions"):
        run_lenses(model, images(), "unused", captions=["x"], progress=False)


def _dp_worker(r: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=world)
    try:
        imgs = images() * 2  # 6 images, batches of 2 -> 3 batches over the ranks
        run_lenses(
            build("olmo-vit"),
            imgs,
            out,
            layers=LAYERS,
            index=tiny_index(),
            top_k=TOP_K,
            image_indices=list(range(10, 16)),
            batch_size=2,
            progress=False,
        )
    finally:
        dist.destroy_process_group()


def _strip(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k not in ("processing_time_seconds", "num_processes")}


def test_data_parallel_run_equals_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dp_worker, args=(2, port, str(tmp_path / "dp")), nprocs=2, join=True)
    run_lenses(
        build("olmo-vit"),
        images() * 2,
        tmp_path / "one",
        layers=LAYERS,
        index=tiny_index(),
        top_k=TOP_K,
        image_indices=list(range(10, 16)),
        batch_size=2,
        progress=False,
    )
    one = sorted((tmp_path / "one").rglob("*.json"))
    assert len(one) == 3 * len(LAYERS)
    for path in one:
        twin = tmp_path / "dp" / path.relative_to(tmp_path / "one")
        a, b = _load(path), _load(twin)
        assert _strip(a) == _strip(b), path.name
        assert b.get("num_processes", 2) == 2
