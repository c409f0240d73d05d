"""The judge's own commands (``python -m reproduce evaluate ...`` or ``python -m reproduce.judge``):
judge one folder of lens results, aggregate judged folders, or serve the fake judge.

Each command only parses options, calls the library and reports. The judge client's
options are the ones of the pipeline's step 4 (`reproduce.options`).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from latentlens.options import parse_layers
from reproduce.judge.render import ENCODERS
from reproduce.options import judge_client_options, judge_config, sampling_options


@click.group(
    "evaluate", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages (retries, skipped images).")
def main(verbose: bool) -> None:
    """Judge visual-token explanations with an LLM and aggregate the verdicts (SPEC §7).

    \b
      judge        one lens × one model: sample patches, ask the judge, write the results
      aggregate    all judged folders → scores JSON, figures, table beside the paper
      fake-server  serve the deterministic fake judge on 127.0.0.1 (offline runs, tests)
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpx2", "openai"):  # one line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)


@main.command()
@click.option(
    "--results-dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Folder of one lens's per-layer JSON files for one model.",
)
@click.option(
    "--images-dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Folder of the images, named 00012.jpg / 12.jpg (or .png).",
)
@click.option(
    "--output-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Where evaluation_results.json and the cache go (<eval>/<lens>/<model>).",
)
@click.option("--lens", default=None, help="Lens name [default: the output folder's parent].")
@click.option("--vlm", default=None, help="Model name [default: the output folder's name].")
@click.option(
    "--encoder",
    type=click.Choice(ENCODERS),
    default=None,
    help="How the model framed images [default: from the model's name].",
)
@click.option("--layers", default=None, help="Comma-separated query layers [default: all found].")
@click.option("--patches-per-layer", default=100, show_default=True, type=click.IntRange(1))
@sampling_options
@click.option(
    "--convention",
    type=click.Choice(["encoder", "original"]),
    default=None,
    help="Real-patch test: the encoder's input, or the released evaluator's 512-px cells "
    "(reproduces its patch choice) [default: original for the paper's models, else encoder].",
)
@click.option(
    "--input-size",
    type=int,
    default=None,
    help="Side of the encoder's square input, for the real-patch test [default: 14 px per patch].",
)
@judge_client_options
@click.option(
    "--cache",
    "cache_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Verdict cache [default: <output-dir>/judge_cache.jsonl].",
)
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar [default: on a terminal]."
)
def judge(**opts: Any) -> None:
    """Judge one lens's results for one model; resumable, never judging a patch twice."""
    from reproduce.judge.client import FatalJudgeError
    from reproduce.judge.fake import FakeJudgeServer
    from reproduce.judge.judge import evaluate

    server = FakeJudgeServer().start() if opts["fake_judge"] else None
    try:
        config = judge_config(opts, server.url if server else None)
        progress = sys.stderr.isatty() if opts["progress"] is None else opts["progress"]
        try:
            ev = evaluate(
                opts["results_dir"],
                opts["images_dir"],
                opts["output_dir"],
                config,
                lens=opts["lens"],
                model=opts["vlm"],
                encoder=opts["encoder"],
                layers=parse_layers(opts["layers"]),
                patches_per_layer=opts["patches_per_layer"],
                seed=opts["seed"],
                seeding=opts["seeding"],
                concurrency=opts["concurrency"],
                cache_path=opts["cache_path"],
                dry_run=opts["dry_run"],
                convention=opts["convention"],
                input_size=opts["input_size"],
                progress=progress,
            )
        except FatalJudgeError as e:
            click.echo(f"Error: the judge refused the request: {e}", err=True)
            sys.exit(2)
        except (OSError, ValueError, RuntimeError) as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(1)
    finally:
        if server:
            server.stop()

    n_layers = len({t.layer for t in ev.tasks})
    click.echo(
        f"planned {len(ev.tasks)} patches over {n_layers} layer(s); judge {config.model} "
        f"at {config.endpoint}"
    )
    click.echo(ev.estimate.describe())
    if opts["dry_run"] or ev.run is None:
        return
    run = ev.run
    click.echo(
        f"sent {run.sent} patch(es), reused {run.reused} cached verdict(s), "
        f"{len(run.failures)} failure(s); tokens used: {run.usage or 'n/a'}"
    )
    for item in ev.results:
        line = (
            f"  layer {item['layer']:>3}: {item['interpretable_count']}/{item['total_count']} "
            f"interpretable ({100 * item['interpretable_fraction']:.2f}%)"
        )
        if item["failed_count"]:
            line += (
                f", {item['failed_count']} failed (excluding them: "
                f"{100 * item['interpretable_fraction_judged']:.2f}%)"
            )
        click.echo(line)
    click.echo(f"results: {ev.results_path}")
    if run.failures:
        click.echo(
            f"{len(run.failures)} patch(es) failed and were not counted as verdicts; "
            "run again to retry them.",
            err=True,
        )
        if opts["strict"]:
            sys.exit(3)


@main.command()
@click.argument("eval_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--out",
    "out_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Output folder [default: EVAL_DIR].",
)
@click.option("--dpi", default=150, show_default=True)
def aggregate(eval_dir: str, out_dir: str | None, dpi: int) -> None:
    """Scores {lens: {model: {layer: percent}}}, figures and a table beside the paper's numbers."""
    from reproduce.judge.aggregate import write_report

    try:
        paths = write_report(eval_dir, out_dir or eval_dir, dpi=dpi)
    except FileNotFoundError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    click.echo(Path(paths["summary"]).read_text(encoding="utf-8"))
    for name, path in paths.items():
        click.echo(f"{name}: {path}")


@main.command("fake-server")
@click.option("--port", default=0, show_default=True, help="0 picks a free port.")
@click.option(
    "--fault",
    "faults",
    multiple=True,
    help="A behaviour for the next request "
    "(429, 500, slow, malformed, ...); repeat for a schedule.",
)
@click.option(
    "--vocabulary",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Words judged concrete, one per line [default: a hash of the word decides].",
)
def fake_server(port: int, faults: tuple[str, ...], vocabulary: str | None) -> None:
    """Serve the deterministic fake judge on 127.0.0.1 until interrupted."""
    from reproduce.judge.fake import FakeJudge, FakeJudgeServer

    words = Path(vocabulary).read_text(encoding="utf-8").split("\n") if vocabulary else None
    judge = FakeJudge([w for w in words if w.strip()] if words else None)
    with FakeJudgeServer(judge, faults=faults, port=port) as server:
        click.echo(f"fake judge listening: --base-url {server.url}", err=False)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
