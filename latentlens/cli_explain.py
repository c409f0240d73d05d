"""`latentlens explain-image`: what quickstart.py does, as a command of the library.

Registered on the `latentlens` group by `latentlens.cli`; `quickstart.py` runs the same
command. The library is imported when the command runs, so `--help` stays fast.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar

import click

from latentlens.options import parse_int_list, user_errors

DEFAULT_MODEL = "Qwen/Qwen2-VL-7B-Instruct"
DEFAULT_BANK = "McGill-NLP/latentlens-qwen2vl-embeddings"
F = TypeVar("F", bound=Callable[..., Any])


def _apply(options: list[Callable[[F], F]]) -> Callable[[F], F]:
    def wrap(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return wrap


# The options both commands take, defined once.
_MODEL_OPTIONS = _apply(
    [
        click.option(
            "--model", default=DEFAULT_MODEL, show_default=True, help="VLM: Hub id or local folder."
        ),
        click.option(
            "--bank", default=None, help=f"Bank: Hub id or local folder [default: {DEFAULT_BANK}]."
        ),
        click.option(
            "--layers", default="2,8,27", show_default=True, help="Query layers (comma-separated)."
        ),
        click.option(
            "--bank-layers", default=None, help="Bank layers to load and search (default: all)."
        ),
    ]
)
_RUN_OPTIONS = _apply(
    [
        click.option("--seed", default=10, show_default=True, help="Seed of the sample shown."),
        click.option("--top-k", default=5, show_default=True),
        click.option("--device", default=None, help="cuda / cpu (default: cuda if available)."),
        click.option(
            "--model-dtype",
            "dtype",
            default=None,
            help="Model compute dtype: fp16 / bf16 / fp32 (default: bf16 on CUDA where "
            "supported, else fp16; fp32 on CPU).",
        ),
    ]
)


def _output_options(png: str, html: str) -> Callable[[F], F]:
    return _apply(
        [
            click.option(
                "--out",
                default=None,
                type=click.Path(dir_okay=False),
                help=f"{png} path [default: <stem>_latentlens.png].",
            ),
            click.option(
                "--json",
                "json_path",
                default=None,
                is_flag=False,
                flag_value="",
                help="Also write JSON: every visual token (optional path).",
            ),
            click.option(
                "--html",
                "html_path",
                default=None,
                is_flag=False,
                flag_value="",
                help=f"Also write {html} (optional path).",
            ),
        ]
    )


def _load(model: str, device: str | None, dtype: str | None) -> tuple[Any, Any, Any]:
    """The VLM, its processor and the device it runs on."""
    import torch

    from latentlens.models.loading import default_compute_dtype, load_model, load_processor

    run_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_dtype = dtype or default_compute_dtype(run_device)
    click.echo(f"loading {model} ({run_dtype}, {run_device}) ...", err=True)
    vlm, _tok = load_model(model, device=run_device, dtype=run_dtype)
    return vlm, load_processor(model), run_device


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    click.echo(f"wrote {path}", err=True)


@click.command(
    "explain-image",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.argument("image", type=click.Path(exists=True, dir_okay=False), required=False)
@click.option(
    "--image",
    "image_option",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The image, as an option (quickstart.py's spelling of IMAGE).",
)
@_MODEL_OPTIONS
@click.option(
    "--build-bank",
    "build_corpus",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Build a bank from this corpus with the VLM's own language model first.",
)
@click.option(
    "--num-patches",
    default=10,
    show_default=True,
    help="Patches sampled for the table and picture.",
)
@click.option(
    "--patches", "patch_list", multiple=True, help="Patch 'row,col' to show instead (repeatable)."
)
@click.option(
    "--lenses",
    "lens_names",
    default="latentlens",
    show_default=True,
    help="Lenses to run: latentlens plus logitlens and/or embeddinglens (the three-lens view).",
)
@click.option(
    "--size",
    default=448,
    show_default=True,
    help="Side of the square the image is centre-cropped and resized to (0: as it is).",
)
@_RUN_OPTIONS
@_output_options("PNG", "the HTML explorer")
@click.option(
    "--first-layer-only",
    is_flag=True,
    help="Draw only the first layer in the PNG (the original's picture).",
)
@user_errors
def explain_image_command(
    image,
    image_option,
    model,
    bank,
    build_corpus,
    layers,
    bank_layers,
    num_patches,
    patch_list,
    lens_names,
    seed,
    top_k,
    size,
    device,
    dtype,
    out,
    json_path,
    html_path,
    first_layer_only,
) -> None:
    """Explain what each visual token of IMAGE means, by its nearest contextual text tokens.

    IMAGE defaults to the bundled example. The VLM runs once; each visual token's hidden
    state at the query layers (--layers; the forward stops at the deepest) is searched in
    every bank layer. Prints a table for --num-patches patches (sampled once with --seed,
    or --patches r,c) and writes <image-stem>_latentlens.png (grid, numbered patches, top
    word per layer); --json writes every patch, --html a self-contained explorer page.
    """

    from latentlens.explain import explain_image
    from latentlens.extract import build_index
    from latentlens.index import ContextualIndex
    from latentlens.viz.html import explorer_html
    from latentlens.viz.patches import patch_figure
    from latentlens.vlm import load_image

    if image and image_option:
        raise click.UsageError("give the image once: IMAGE or --image")
    chosen = image or image_option
    image_file = Path(chosen) if chosen else Path(str(files("latentlens") / "data" / "example.png"))
    vlm, processor, run_device = _load(model, device, dtype)
    if build_corpus:
        target = Path(bank) if bank else Path(f"{Path(model).name}_bank")
        index = build_index(
            model,
            build_corpus,
            model=vlm,
            tokenizer=processor.tokenizer,
            layers=parse_int_list(bank_layers),
            output_dir=target,
        )
    else:
        index = ContextualIndex.from_pretrained(
            bank or DEFAULT_BANK, layers=parse_int_list(bank_layers)
        )
    index.to(run_device)
    patches = None
    image = load_image(image_file)
    ex = explain_image(
        vlm,
        processor,
        image,
        index,
        parse_int_list(layers) or [],
        top_k=top_k,
        size=size,
        num_patches=num_patches,
        seed=seed,
        lenses=[x.strip() for x in lens_names.split(",") if x.strip()],
    )
    if patch_list:
        rc = [parse_int_list(p) for p in patch_list]
        if any(x is None or len(x) != 2 for x in rc):
            raise click.BadParameter("--patches takes 'row,col'")
        patches = [r * ex.grid[1] + c for r, c in rc]  # type: ignore[misc]
        bad = [
            p
            for p, (r, c) in zip(patches, rc, strict=True)
            if not (0 <= r < ex.grid[0] and 0 <= c < ex.grid[1])
        ]  # type: ignore[misc]
        if bad:
            raise click.BadParameter(
                f"patches outside the {ex.grid[0]}×{ex.grid[1]} grid: {patch_list}"
            )
        ex.patches = patches
    ex.image_name = image_file.name
    ex.image_path = str(image_file.resolve())
    click.echo(ex.table())
    stem = image_file.with_suffix("")
    png = Path(out) if out else stem.parent / f"{stem.name}_latentlens.png"
    fig = patch_figure(ex, layers=ex.layers[:1] if first_layer_only else None)
    fig.savefig(png, dpi=100)
    click.echo(f"wrote {png}", err=True)
    if json_path is not None:
        doc = json.dumps(ex.to_dict(all_patches=True), ensure_ascii=False)
        _write(Path(json_path) if json_path else png.with_suffix(".json"), doc)
    if html_path is not None:
        _write(Path(html_path) if html_path else png.with_suffix(".html"), explorer_html(ex))


@click.command(
    "explain-video",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.argument("video", nargs=-1, required=True, type=click.Path(exists=True))
@_MODEL_OPTIONS
@click.option(
    "--num-frames", type=click.IntRange(1), default=None, help="Frames kept, evenly spaced."
)
@click.option(
    "--num-patches",
    default=10,
    show_default=True,
    help="Tokens highlighted in the table and strip.",
)
@_RUN_OPTIONS
@_output_options("PNG strip", "the HTML explorer with a frame slider")
@user_errors
def explain_video_command(
    video,
    model,
    bank,
    layers,
    bank_layers,
    num_frames,
    num_patches,
    seed,
    top_k,
    device,
    dtype,
    out,
    json_path,
    html_path,
) -> None:
    """Explain what each visual token of a VIDEO means, frame by frame.

    VIDEO is a video file (read by transformers' load_video; needs PyAV), an animated
    GIF/WebP, a folder of frames, or several frame images. Every visual token is addressed
    by its temporal group (the frames merged into it), row and column; its hidden state at
    the query layers is searched in the bank. Prints a table, writes a PNG strip (one panel
    per temporal group) and, with --json, every token with its neighbours; --html an
    explorer page with a slider over the temporal groups.
    """

    from latentlens.explain import explain_video
    from latentlens.index import ContextualIndex
    from latentlens.viz.html import video_explorer_html
    from latentlens.viz.video import video_strip
    from latentlens.vlm import load_frames

    source = list(video) if len(video) > 1 else video[0]
    frames = load_frames(source, num_frames=num_frames)
    vlm, processor, run_device = _load(model, device, dtype)
    index = ContextualIndex.from_pretrained(
        bank or DEFAULT_BANK, layers=parse_int_list(bank_layers)
    )
    index.to(run_device)
    ex = explain_video(
        vlm,
        processor,
        frames,
        index,
        parse_int_list(layers) or [],
        top_k=top_k,
        num_patches=num_patches,
        seed=seed,
    )
    first = Path(video[0])
    ex.video_name = first.name
    ex.video_paths = [str(Path(v).resolve()) for v in video]
    click.echo(ex.table())
    stem = first.with_suffix("") if first.is_file() else first
    png = Path(out) if out else stem.parent / f"{stem.name}_latentlens.png"
    video_strip(ex).savefig(png, dpi=100)
    click.echo(f"wrote {png}", err=True)
    if json_path is not None:
        doc = json.dumps(ex.to_dict(), ensure_ascii=False)
        _write(Path(json_path) if json_path else png.with_suffix(".json"), doc)
    if html_path is not None:
        page = video_explorer_html(ex)
        _write(Path(html_path) if html_path else png.with_suffix(".html"), page)


@click.command(
    "explain-audio",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.argument("audio", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", required=True, help="Audio-text model (Qwen2-Audio): Hub id or folder.")
@click.option("--bank", default=None, help="Bank built from the model's own language model.")
@click.option(
    "--build-bank",
    "build_corpus",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="Build the bank first from this caption corpus with the model's language model.",
)
@click.option("--layers", default="1", show_default=True, help="Query layers (comma-separated).")
@click.option("--bank-layers", default=None, help="Bank layers to search (default: all).")
@click.option(
    "--prompt", default=None, help="Text with the audio placeholder (default: the family's)."
)
@click.option("--top-k", default=5, show_default=True)
@click.option("--every", default=5, show_default=True, help="Print every N-th token in the table.")
@click.option("--device", default=None, help="cuda / cpu (default: cuda if available).")
@click.option("--model-dtype", "dtype", default=None, help="fp16 / bf16 / fp32.")
@click.option(
    "--json",
    "json_path",
    default=None,
    is_flag=False,
    flag_value="",
    help="Write JSON: every audio token with its time span (optional path).",
)
@user_errors
def explain_audio_command(
    audio, model, bank, build_corpus, layers, bank_layers, prompt, top_k, every, device, dtype,
    json_path,
) -> None:  # fmt: skip
    """Explain what each audio token of AUDIO (a PCM .wav) means, with its time span.

    Each token of the audio-text model pools a fixed stretch of time (40 ms for
    Qwen2-Audio); its hidden state at the query layers is searched in a bank of the model's
    own language model (--bank, or --build-bank CORPUS to make one). Prints a table and, with
    --json, every token's start / end in seconds and its neighbours.
    """
    from latentlens.audio import explain_audio
    from latentlens.extract import build_index
    from latentlens.index import ContextualIndex

    if not bank and not build_corpus:
        raise click.UsageError("give --bank BANK or --build-bank CORPUS")
    net, processor, run_device = _load(model, device, dtype)
    chosen = parse_int_list(bank_layers)
    if build_corpus:
        index = build_index(model, build_corpus, model=net, tokenizer=processor.tokenizer,
                            layers=chosen, output_dir=bank or f"{Path(model).name}_bank")  # fmt: skip
    else:
        index = ContextualIndex.from_pretrained(bank, layers=chosen)
    index.to(run_device)
    ex = explain_audio(net, processor, audio, index, parse_int_list(layers) or [1],
                       top_k=top_k, prompt=prompt)  # fmt: skip
    ex.audio_name = Path(audio).name
    click.echo(ex.table(every=max(1, every)))
    if json_path is not None:
        target = Path(json_path) if json_path else Path(audio).with_suffix(".latentlens.json")
        _write(target, json.dumps(ex.to_dict(), ensure_ascii=False))
