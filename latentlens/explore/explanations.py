"""Read the JSON of ``latentlens explain-image`` / ``explain-video`` (and quickstart) into a site.

Each file is one image or one video; files of the same model and bank become one model
page. The picture is found from the file (``image_path`` / ``video_paths``), else beside the
JSON, else in ``images_dir``. Token boxes come from each token's ``pixel_box`` (in the
original image or frame); results without addresses get a uniform grid over the picture.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from latentlens.errors import ExploreError, LatentLensError
from latentlens.explore.site import Group, Site, Token
from latentlens.results import Neighbor
from latentlens.vlm import load_frames, load_image


def _candidates(paths: Iterable[str | os.PathLike[str]]) -> list[tuple[Path, Path | None]]:
    """``(json file, the folder it was found in or None)`` for each result named: a file, a
    folder (its ``*.json``), or a PNG / HTML that explain-image wrote beside its JSON. Only
    names are checked here; each file is read once, when it is added.

    Raises:
        ExploreError: a path that exists nowhere, a folder without JSON files, or a PNG /
            HTML without its JSON.
    """
    found: dict[Path, Path | None] = {}
    for p in map(Path, paths):
        if p.is_dir():
            inside = sorted(p.glob("*.json"))
            if not inside:
                raise ExploreError(
                    f"{p} holds no explain-image / explain-video JSON (run them with --json)"
                )
            for f in inside:
                found.setdefault(f, p)
        elif p.suffix.lower() == ".json" and p.is_file():
            found[p] = None
        elif p.is_file() and p.with_suffix(".json").is_file():
            found[p.with_suffix(".json")] = None
        elif p.exists():
            raise ExploreError(
                f"{p}: no {p.with_suffix('.json').name} beside it (run explain-image with --json)"
            )
        else:
            raise ExploreError(f"{p} does not exist")
    return list(found.items())


def _is_explanation(doc: Any) -> bool:
    return (
        isinstance(doc, dict)
        and isinstance(doc.get("layers"), dict)
        and ("grid" in doc or "video" in doc)
    )


def _read(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ExploreError(f"cannot read {path}: {e}") from e


def _picture_path(doc: Mapping[str, Any], json_path: Path, images_dir: Path | None) -> Path:
    tried = []
    name = str(doc.get("image") or "")
    for cand in (
        doc.get("image_path"),
        json_path.parent / name if name else None,
        images_dir / name if images_dir and name else None,
    ):
        if cand:
            tried.append(str(cand))
            if Path(cand).is_file():
                return Path(cand)
    raise ExploreError(
        f"{json_path}: cannot find its image ({', '.join(tried) or 'no name recorded'}); "
        "pass --images DIR"
    )


def _open_rgb(path: Path) -> Image.Image:
    try:
        return load_image(path)
    except (OSError, ValueError, LatentLensError) as e:
        raise ExploreError(f"cannot open image {path}: {e}") from e


def _video_frames(
    doc: Mapping[str, Any], json_path: Path, images_dir: Path | None
) -> list[Image.Image]:
    paths = [Path(p) for p in doc.get("video_paths") or []]
    if not paths or not all(p.exists() for p in paths):
        name = str(doc.get("video") or "")
        for base in (json_path.parent, images_dir):
            if base is not None and name and (base / name).exists():
                paths = [base / name]
                break
        else:
            raise ExploreError(
                f"{json_path}: cannot find its video ({name or 'no name recorded'}); "
                "pass --images DIR"
            )
    source: Any = [str(p) for p in paths] if len(paths) > 1 else str(paths[0])
    try:
        frames = load_frames(source, num_frames=doc.get("num_frames"))
    except (OSError, ValueError, LatentLensError) as e:
        raise ExploreError(f"cannot read the frames of {paths[0]}: {e}") from e
    want = doc.get("num_frames")
    if want is not None and len(frames) != int(want):
        raise ExploreError(
            f"{json_path}: {paths[0]} gives {len(frames)} frames, the results {want}"
        )
    return frames


def patch_neighbors(patch: Mapping[str, Any]) -> dict[str, list[Neighbor]]:
    """``lens → neighbours`` of one patch record, in the original files' field names
    (``nearest_contextual_neighbors``, ``top_predictions``, ``nearest_neighbors``): those
    present."""
    out = {}
    if "nearest_contextual_neighbors" in patch:
        out["latentlens"] = [Neighbor.from_dict(n) for n in patch["nearest_contextual_neighbors"]]
    if "top_predictions" in patch:
        out["logitlens"] = [
            Neighbor(
                token_str=str(p["token"]),
                similarity=float(p["logit"]),
                token_id=int(p.get("token_id", -1)),
                probability=None if p.get("probability") is None else float(p["probability"]),
            )
            for p in patch["top_predictions"]
        ]
    if "nearest_neighbors" in patch:
        out["embeddinglens"] = [
            Neighbor(
                token_str=str(p["token"]),
                similarity=float(p["similarity"]),
                token_id=int(p.get("token_id", -1)),
            )
            for p in patch["nearest_neighbors"]
        ]
    return out


def _geometry(
    patches: Sequence[Mapping[str, Any]],
    grid: Sequence[int],
    sizes: Sequence[tuple[int, int]],
    video: bool,
) -> tuple[list[Group], list[Token]]:
    """Groups (crops or temporal groups) and token boxes, in the order of ``patches``."""
    groups: dict[Any, int] = {}
    names: list[str] = []
    pictures: list[int] = []
    tokens = []
    for p in patches:
        if video:
            frames = p.get("frames") or [p.get("frame") or 0]
            key = tuple(frames)
            name = f"frames {frames[0]}–{frames[-1]}" if len(frames) > 1 else f"frame {frames[0]}"
            picture = int(frames[0])
        else:
            key = p.get("crop") or "image"
            name, picture = str(key), 0
        if key not in groups:
            groups[key] = len(groups)
            names.append(name)
            pictures.append(picture)
        g = groups[key]
        row, col = int(p["patch_row"]), int(p["patch_col"])
        box = p.get("pixel_box")
        if box:
            w, h = sizes[pictures[g]]
            x0, y0, x1, y1 = (float(v) for v in box)
            frac = (x0 / w, y0 / h, x1 / w, y1 / h)
        else:  # no address: the main grid, uniformly over the picture
            gh, gw = int(grid[0]), int(grid[1])
            frac = (col / gw, row / gh, (col + 1) / gw, (row + 1) / gh)
        tokens.append(Token(int(p["patch_idx"]), g, row, col, frac))
    return [Group(n, pic) for n, pic in zip(names, pictures, strict=True)], tokens


def add_explanations(
    site: Site,
    results: Iterable[str | os.PathLike[str]],
    images_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Add the explanations named by ``results`` to ``site``: JSON files of explain-image /
    explain-video (one image or video each; key = order), folders of them (other JSON files
    there are passed over), or the PNG / HTML written beside one.

    Raises:
        ExploreError: a path that exists nowhere, a file named that is not an explanation or
            cannot be read, a folder without any, or a picture that cannot be found.
    """
    images = Path(images_dir) if images_dir else None
    keys: dict[str, int] = {}
    folders_used: dict[Path, bool] = {}
    for path, folder in _candidates(results):
        if folder is not None:
            folders_used.setdefault(folder, False)
            try:
                doc = _read(path)
            except ExploreError:
                continue
            if not _is_explanation(doc):
                continue
            folders_used[folder] = True
        else:
            doc = _read(path)
            if not _is_explanation(doc):
                raise ExploreError(
                    f"{path} is not the JSON of latentlens explain-image / explain-video"
                )
        _add_one(site, path, doc, images, keys)
    empty = [f for f, used in folders_used.items() if not used]
    if empty:
        raise ExploreError(
            f"{empty[0]} holds no explain-image / explain-video JSON (run them with --json)"
        )


def _add_one(
    site: Site, path: Path, doc: Mapping[str, Any], images: Path | None, keys: dict[str, int]
) -> None:
    """One explanation file (already read) → its model's pages."""
    video = "video" in doc
    model_name = str(doc.get("model") or doc.get("family") or "model")
    bank = str(doc.get("bank") or "")
    name = f"{model_name} · {bank}" if bank else model_name
    pages = site.model(name, label=model_name, family=str(doc.get("family", "")), bank=bank)
    key = keys.get(name, 0)
    keys[name] = key + 1
    layers = sorted(doc["layers"].items(), key=lambda kv: int(kv[0]))
    if not layers:
        raise ExploreError(f"{path}: no layer in the results")
    patches = layers[0][1]["patches"]
    if video:
        pictures = _video_frames(doc, path, images)
        title = str(doc.get("video") or path.stem)
    else:
        pictures = [_open_rgb(_picture_path(doc, path, images))]
        title = str(doc.get("image") or path.stem)
    try:
        groups, tokens = _geometry(
            patches, doc.get("grid") or [1, 1], [p.size for p in pictures], video
        )
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ExploreError(f"{path}: malformed patch entries ({e})") from e
    pages.add_image(
        key,
        pictures=pictures,
        groups=groups,
        tokens=tokens,
        name=title,
        caption="",
        kind="video" if video else "image",
    )
    ids = [t.id for t in tokens]
    for layer, entry in layers:
        by_id = {int(p["patch_idx"]): p for p in entry["patches"]}
        if sorted(by_id) != sorted(ids):
            raise ExploreError(
                f"{path}: layer {layer} holds other patches than layer {layers[0][0]}"
            )
        per = [patch_neighbors(by_id[i]) for i in ids]
        lenses = {lens: [p[lens] for p in per] for lens in per[0]}
        pages.add_layer(key, int(layer), lenses)
