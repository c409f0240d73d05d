"""``python -m reproduce``: the paper's pipeline, one command per step (reproduce/*.sh).

Each command only parses options, calls :mod:`reproduce` and reports. Every step
skips the work whose outputs are already there (``--force`` redoes it).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

from latentlens.options import parse_layers
from reproduce.judge.cli import main as evaluate_group
from reproduce.options import judge_client_options, judge_config, sampling_options

DEFAULT_OUT = "out/paper"
DEFAULT_TINY_OUT = "out/tiny"


def _names(value: str | None) -> list[str] | None:
    if value is None or value.strip().lower() in ("", "all"):
        return None
    return [x.strip() for x in value.split(",") if x.strip()]


def common(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options every step takes: where the run lives, tiny mode, models, force."""
    options = [
        click.option(
            "--out",
            default=None,
            type=click.Path(file_okay=False),
            help=f"Run folder [default: {DEFAULT_OUT}, or {DEFAULT_TINY_OUT} with --tiny].",
        ),
        click.option(
            "--tiny", is_flag=True, help="Tiny random models, offline (see `run_all.sh --tiny`)."
        ),
        click.option(
            "--models",
            default=None,
            help="Comma-separated models [default: the nine connector VLMs and qwen2vl; "
            "--tiny: olmo-vit,qwen-siglip,qwen2vl].",
        ),
        click.option("--force", is_flag=True, help="Redo this step even where it is done."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _setup(out: str | None, tiny: bool, models: str | None) -> tuple[Any, list[str]]:
    from reproduce.data.tiny import TINY_MODELS
    from reproduce.layout import Layout, parse_models

    layout = Layout.at(out or (DEFAULT_TINY_OUT if tiny else DEFAULT_OUT))
    names = parse_models(models, TINY_MODELS) if tiny else parse_models(models)
    return layout, names


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """The LatentLens paper's pipeline: download, extract, lenses, judge, aggregate.

    \b
      download    step 1: connectors / public banks from the Hub (--tiny: make tiny models)
      extract     step 2: one contextual bank per LLM from a caption corpus (paper mode)
      lenses      step 3: LatentLens, LogitLens, EmbeddingLens at every layer, N images
      judge       step 4: the LLM judge of SPEC §7 over every (lens, model)
      aggregate   step 5: scores JSON, figures, table beside the paper's numbers
      explore     step 6: the explorer site (three lenses, every layer, judge verdicts)
      vg-phrases  make the Visual Genome phrase corpus from region_descriptions.json
      evaluate    the judge's own commands: judge one folder, aggregate, fake-server
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpx2", "openai", "urllib3", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@main.command()
@common
@click.option(
    "--bank-layers", default=None, help="Layers of the public Qwen2-VL bank [default: all]."
)
@click.option("--base", is_flag=True, help="Also fetch the base LLMs, ViTs and Qwen2-VL weights.")
@click.option(
    "--no-public-bank", is_flag=True, help="Skip the public Qwen2-VL bank (build it in step 2)."
)
@click.option("--cache-dir", default=None, help="Hugging Face cache directory.")
def download(
    out: str | None,
    tiny: bool,
    models: str | None,
    force: bool,
    bank_layers: str | None,
    base: bool,
    no_public_bank: bool,
    cache_dir: str | None,
) -> None:
    """Step 1: fetch connectors (and the public Qwen2-VL bank) for the chosen models.

    Only what is asked for; resumable; with HF_HUB_OFFLINE=1 everything comes from the local
    cache. With --tiny, make the tiny models, corpus and images instead (offline).
    """
    from reproduce.steps.download import download as run_download
    from reproduce.steps.download import setup_tiny_step

    layout, names = _setup(out, tiny, models)
    if tiny:
        record = setup_tiny_step(layout, names, force=force)
    else:
        try:
            record = run_download(
                layout,
                names,
                bank_layers=parse_layers(bank_layers),
                base=base,
                public_bank=not no_public_bank,
                cache_dir=cache_dir,
                force=force,
            )
        except OSError as e:
            _fail(
                f"download failed ({e}); rerun to resume, or set HF_HUB_OFFLINE=1 to use the cache"
            )
    verb = "already done" if record["skipped"] else "done"
    click.echo(f"step 1 {verb}: {len(record['files'])} item(s), see {layout.downloads}")


@main.command()
@common
@click.option(
    "--corpus",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="Caption corpus, one phrase per line (the paper: Visual Genome phrases, see "
    "`vg-phrases`) [--tiny: the generated corpus].",
)
@click.option(
    "--banks",
    default=None,
    help="Banks to build: olmo, llama, qwen, qwen2vl [default: the LLMs of --models].",
)
@click.option(
    "--qwen2vl-bank",
    type=click.Choice(["public", "build"]),
    default="public",
    show_default=True,
    help="Qwen2-VL: use the public bank (step 1) or build one from the corpus.",
)
@click.option(
    "--bank-layers", default=None, help="Bank layers [default: 1,2,4,8,16,24 below n, n-2, n-1]."
)
@click.option("--cap", default=20, show_default=True, help="Contexts per token string.")
@click.option(
    "--bank-batch-size", default=32, show_default=True, help="Sentences per forward pass."
)
@click.option("--device", default=None, help="cuda / cpu [default: cuda if available].")
@click.option(
    "--model-dtype",
    "dtype",
    default=None,
    help="Model compute dtype [default: fp16 on CUDA, fp32 on CPU].",
)
def extract(
    out: str | None,
    tiny: bool,
    models: str | None,
    force: bool,
    corpus: str | None,
    banks: str | None,
    qwen2vl_bank: str,
    bank_layers: str | None,
    cap: int,
    bank_batch_size: int,
    device: str | None,
    dtype: str | None,
) -> None:
    """Step 2: build a bank per LLM in paper mode (reservoir cap 20, seed 42, fp8), resumably."""
    from latentlens.extract import BuildConfig
    from reproduce.layout import bank_name
    from reproduce.steps.banks import extract_banks

    layout, names = _setup(out, tiny, models)
    wanted = _names(banks) or list(dict.fromkeys(bank_name(m) for m in names))
    if not tiny and qwen2vl_bank == "public" and banks is None:
        wanted = [b for b in wanted if b != "qwen2vl"]
    sources = None
    if tiny:
        from reproduce.data.tiny import read_tiny, tiny_llm_path

        info = read_tiny(layout)
        corpus = corpus or info["corpus"]
        sources = {b: str(tiny_llm_path(layout, b)) for b in wanted}
    if corpus is None:
        _fail("--corpus is required (a caption file, e.g. the Visual Genome phrases)")
    status = extract_banks(
        layout,
        wanted,
        corpus,
        sources=sources,
        layers=parse_layers(bank_layers),
        settings=BuildConfig.paper(cap=cap),
        batch_size=bank_batch_size,
        device=device,
        dtype=dtype,
        force=force,
        show_progress=sys.stderr.isatty(),
    )
    for name, s in status.items():
        click.echo(f"step 2: bank {name}: {s} ({layout.bank(name)})")


@main.command()
@common
@click.option(
    "--images",
    "source",
    default=None,
    help="pixmo-cap (its parquet files on the Hub), or a local .jsonl / .parquet listing "
    "or image folder [default: pixmo-cap; --tiny: the generated images].",
)
@click.option(
    "--num-images",
    default=None,
    type=click.IntRange(1),
    help="Images, first N loadable in index order [default: 100; --tiny: 6].",
)
@click.option(
    "--molmo-split",
    is_flag=True,
    help="The local listing is PixMo-Cap's train listing: take Molmo's validation split "
    "(always done for pixmo-cap).",
)
@click.option(
    "--available",
    default=None,
    type=click.Path(dir_okay=False),
    help="The train rows Molmo had (image URLs or row indices, one per line; or .jsonl / "
    ".parquet with image_url): Molmo's split is taken over these, as Molmo did.",
)
@click.option(
    "--match-captions",
    default=None,
    type=click.Path(file_okay=False),
    help="A folder of the authors' lens result files: take their exact images, found by "
    "each image's ground_truth_caption among PixMo-Cap's train rows.",
)
@click.option(
    "--pixmo-revision",
    default=None,
    help="Revision of allenai/pixmo-cap [default: pinned, the last commit that changed its data].",
)
@click.option(
    "--image-cache",
    default=None,
    type=click.Path(file_okay=False),
    help="Cache of fetched images [default: ~/.cache/latentlens/pixmo-cap]; PixMo-Cap's "
    "parquet files live in the Hugging Face cache (HF_HUB_CACHE).",
)
@click.option("--retry-failed", is_flag=True, help="Try again images that failed to load before.")
@click.option(
    "--layers",
    default=None,
    help="Query layers, or 'all' for 0..n [default: the paper's, 0,1,2,4,8,16,24,n-2,n-1].",
)
@click.option(
    "--lenses",
    "lens_names",
    default=None,
    help="latentlens,logitlens,embeddinglens [default: all three].",
)
@click.option("--top-k", default=5, show_default=True)
@click.option("--batch-size", default=4, show_default=True)
@click.option("--device", default=None, help="cuda / cpu [default: cuda if available].")
@click.option(
    "--model-dtype",
    "dtype",
    default=None,
    help="Model compute dtype: fp16 / bf16 / fp32 [default: fp16 on CUDA, fp32 on CPU].",
)
def lenses(
    out: str | None,
    tiny: bool,
    models: str | None,
    force: bool,
    source: str | None,
    num_images: int | None,
    molmo_split: bool,
    available: str | None,
    match_captions: str | None,
    pixmo_revision: str | None,
    image_cache: str | None,
    retry_failed: bool,
    layers: str | None,
    lens_names: str | None,
    top_k: int,
    batch_size: int,
    device: str | None,
    dtype: str | None,
) -> None:
    """Step 3: the three lenses at every layer of each model, over N evaluation images."""
    from latentlens import distributed as D
    from reproduce.data.pixmo import PIXMO_CAP_REVISION, ImageSourceError
    from reproduce.judge.names import LENSES
    from reproduce.steps.lenses import PIXMO_SOURCE, ImageSource, images_for_run, run_model

    D.init_from_env()  # under torchrun the images are split across the ranks
    layout, names = _setup(out, tiny, models)
    if tiny:
        from reproduce.data.tiny import read_tiny

        source = source or read_tiny(layout)["images"]
    n = num_images or (6 if tiny else 100)
    records = []
    for turn in (0, 1):  # rank 0 fetches the images first; the others then read its cache
        if (D.rank() == 0) == (turn == 0):
            try:
                records = images_for_run(
                    layout,
                    ImageSource(
                        source or PIXMO_SOURCE,
                        split=molmo_split or available is not None,
                        available=available,
                        match_captions=match_captions,
                        revision=pixmo_revision or PIXMO_CAP_REVISION,
                    ),
                    n,
                    cache_dir=image_cache,
                    retry_failed=retry_failed,
                )
            except ImageSourceError as e:
                _fail(str(e))
        D.barrier()
    if not records:
        _fail("no image could be loaded")
    click.echo(f"step 3: {len(records)} image(s) in {layout.images}")
    chosen = _names(lens_names) or list(LENSES)
    for name in names:
        status = run_model(
            layout,
            name,
            records,
            layers="all" if layers and layers.strip() == "all" else parse_layers(layers),
            top_k=top_k,
            lenses=chosen,
            tiny=tiny,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            force=force,
            progress=sys.stderr.isatty(),
        )
        click.echo(f"step 3: {name}: {status}")


@main.command()
@common
@judge_client_options
@click.option("--lenses", "lens_names", default=None, help="Lenses to judge [default: all three].")
@click.option(
    "--patches-per-layer",
    default=None,
    type=click.IntRange(1),
    help="Patches judged per layer, one per image [default: 100; --tiny: the images].",
)
@sampling_options
def judge(
    out: str | None,
    tiny: bool,
    models: str | None,
    force: bool,
    lens_names: str | None,
    patches_per_layer: int | None,
    seed: int,
    **opts: Any,
) -> None:
    """Step 4: judge every (lens, model) with an LLM; resumable, no patch judged twice."""
    from reproduce.judge.client import FatalJudgeError
    from reproduce.judge.names import LENSES
    from reproduce.steps.judging import judge_all

    layout, names = _setup(out, tiny, models)
    if patches_per_layer is None:
        from reproduce.data.pixmo import read_manifest

        patches_per_layer = len(read_manifest(layout.images) or [None]) if tiny else 100
    server = None
    if opts["fake_judge"] or (tiny and not opts["base_url"]):
        from reproduce.judge.fake import FakeJudgeServer

        server = FakeJudgeServer().start()
    config = judge_config(opts, server.url if server else None)
    click.echo(f"step 4: judge {config.model} at {config.endpoint}")
    try:
        outcomes = judge_all(
            layout,
            names,
            config,
            lenses=_names(lens_names) or list(LENSES),
            patches_per_layer=patches_per_layer,
            seed=seed,
            seeding=opts["seeding"],
            concurrency=opts["concurrency"],
            force=force,
            dry_run=opts["dry_run"],
            progress=sys.stderr.isatty(),
        )
    except FatalJudgeError as e:
        _fail(f"the judge refused the request: {e}", 2)
    except (OSError, ValueError, RuntimeError) as e:
        _fail(str(e))
    finally:
        if server:
            server.stop()
    for o in outcomes:
        click.echo(f"step 4: {o.describe()}")
    if opts["dry_run"]:
        calls = sum(o.sent for o in outcomes if o.status == "dry-run")
        cached = sum(o.reused for o in outcomes if o.status == "dry-run")
        costs = [o.dollars for o in outcomes if o.status == "dry-run" and o.sent]
        cost = (
            f", about ${sum(costs):,.2f}"  # type: ignore[arg-type]
            if costs and None not in costs
            else ""
        )
        click.echo(
            f"step 4: dry run: {calls} judge call(s) in all{cost}, {cached} cached; nothing sent"
        )
        return
    failed = sum(o.failed for o in outcomes)
    if failed:
        click.echo(
            f"step 4: {failed} patch(es) failed; they are not counted as verdicts. "
            "Run the step again to retry them.",
            err=True,
        )
        if opts["strict"]:
            sys.exit(3)


@main.command()
@common
@click.option("--dpi", default=150, show_default=True)
def aggregate(out: str | None, tiny: bool, models: str | None, force: bool, dpi: int) -> None:
    """Step 5: {lens: {model: {layer: percent}}} JSON, figures, table beside the paper."""
    from reproduce.steps.judging import aggregate_step

    layout, _ = _setup(out, tiny, models)
    try:
        paths = aggregate_step(layout, force=force, dpi=dpi)
    except FileNotFoundError as e:
        _fail(str(e))
    if not paths:
        click.echo(f"step 5 already done: {layout.report}")
        return
    click.echo((layout.report / "summary.md").read_text(encoding="utf-8"))
    click.echo(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))


@main.command()
@common
@click.option(
    "--max-images", type=click.IntRange(1), default=None, help="Images per model [default: all]."
)
def explore(
    out: str | None, tiny: bool, models: str | None, force: bool, max_images: int | None
) -> None:
    """Step 6: the explorer site of the run, <out>/site/ (open site/index.html; no server)."""
    from latentlens.errors import ExploreError
    from reproduce.site import run_models, site_step

    layout, names = _setup(out, tiny, models)
    chosen = [m for m in names if m in run_models(layout)] if models or tiny else None
    try:
        path = site_step(layout, chosen, force=force, max_images=max_images)
    except ExploreError as e:
        _fail(str(e))
    if path is None:
        click.echo(f"step 6 already done: {layout.site}")
        return
    click.echo(f"wrote {path} — open {(path / 'index.html').as_uri()}")


@main.command("vg-phrases")
@click.argument("region_descriptions", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_txt", type=click.Path(dir_okay=False))
def vg_phrases_cmd(region_descriptions: str, out_txt: str) -> None:
    """Write Visual Genome region phrases (one per line) from region_descriptions.json."""
    from reproduce.steps.banks import vg_phrases

    n = vg_phrases(region_descriptions, out_txt)
    click.echo(f"wrote {n:,} phrases to {out_txt} (the paper's corpus has 2,992,111)")


main.add_command(evaluate_group)

if __name__ == "__main__":
    main()
