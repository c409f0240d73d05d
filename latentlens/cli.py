"""The ``latentlens`` command: build, search, inspect and convert contextual banks.

Each command only parses options, calls the library and prints or writes results. Heavy
imports (torch, transformers) happen inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn latentlens' own errors (user mistakes) into one line on stderr and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from latentlens.errors import LatentLensError

        try:
            return fn(*args, **kwargs)
        except (LatentLensError, FileNotFoundError) as e:
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
@click.option("--rows", default=20_000, show_default=True, help="Rows per layer of the random bank.")
@click.option("--dim", default=256, show_default=True, help="Hidden size.")
@click.option("--top-k", default=5, show_default=True)
@user_errors
def demo(rows: int, dim: int, top_k: int) -> None:
    """Build a random bank, search it, and check the result against brute force."""
    import time

    import torch

    from latentlens.index import ContextualIndex
    from latentlens.search import brute_force

    torch.manual_seed(0)
    words = ["cat", "dog", "red", "sky", "tree", "car", "blue", "grass"]
    meta = [
        {"token_str": words[i % 8], "token_id": i % 8, "caption": f"a {words[i % 8]} #{i}", "position": 2}
        for i in range(rows)
    ]
    index = ContextualIndex.from_tensors({1: torch.randn(rows, dim), 2: torch.randn(rows, dim)}, meta)
    q = index.embeddings(2)[:3].float() + 0.05 * torch.randn(3, dim)
    t = time.perf_counter()
    results = index.search(q, top_k=top_k)
    dt = time.perf_counter() - t
    click.echo(repr(index))
    for i, nbs in enumerate(results):
        click.echo(f"query {i}: " + ", ".join(f"{n.caption!r}@L{n.contextual_layer} {n.similarity:.3f}" for n in nbs))
    ref = brute_force(q, [index.embeddings(1), index.embeddings(2)], top_k)
    ok = [n.similarity for n in results[0]] == [float(x) for x in ref.scores[0].float()]
    click.echo(f"search: {dt * 1000:.1f} ms; matches brute force: {ok}")


if __name__ == "__main__":
    main()
