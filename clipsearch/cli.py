"""The `clipsearch` command. Thin: parse options, call the library, print. Errors become one sentence on stderr
and a non-zero exit; progress goes to stderr so `--json` output on stdout stays clean."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from clipsearch.errors import ClipsearchError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class Group(click.Group):
    """Turns clipsearch's own exceptions into one clear sentence and an exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ClipsearchError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(EXIT_ERROR)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(EXIT_INTERRUPTED)


def common_options(command: Callable[..., Any], *, from_environment: bool = False) -> Callable[..., Any]:
    """--library, --model and --pretrained, accepted before or after the command name.

    Only the group reads the environment variables: a command's own option then means "given after the command
    name", and wins over the group's value, which is either given before the name or taken from the environment.
    """

    def env(name: str) -> str | None:
        return name if from_environment else None

    command = click.option(
        "--pretrained", envvar=env("CLIPSEARCH_PRETRAINED"), help="Pretrained tag for a built-in model name."
    )(command)
    command = click.option(
        "--model",
        envvar=env("CLIPSEARCH_MODEL"),
        help="open_clip model: NAME (with --pretrained), hf-hub:org/repo or local-dir:/path.",
    )(command)
    return click.option(
        "--library",
        envvar=env("CLIPSEARCH_LIBRARY"),
        type=click.Path(file_okay=False, path_type=Path),
        help="Library folder (default: $CLIPSEARCH_LIBRARY, else the user data folder).",
    )(command)


def _settings(ctx: click.Context, library: Path | None, model: str | None, pretrained: str | None) -> dict[str, Any]:
    parent = ctx.find_root().obj or {}
    return {
        "library": library or parent.get("library"),
        "model": model or parent.get("model"),
        "pretrained": pretrained or parent.get("pretrained"),
    }


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@functools.partial(common_options, from_environment=True)
@click.version_option(package_name="clipsearch")
@click.pass_context
def cli(ctx: click.Context, library: Path | None, model: str | None, pretrained: str | None) -> None:
    """Semantic search for your photos: index folders once, then find pictures by describing them."""
    ctx.obj = {"library": library, "model": model, "pretrained": pretrained}


class MemorySize(click.ParamType):
    """A size such as 512MB, 2GiB or a number of bytes (`clipsearch.index.budget.parse_size`)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from clipsearch.index.budget import parse_size

        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


MEMORY_BUDGET_HELP = ("Most memory the index build may use, e.g. 512MB or 2GiB; an index that does not fit is built "
                      "on disk in shards (default: $CLIPSEARCH_INDEX_MEMORY, else half the machine's memory).")


# --- index --------------------------------------------------------------------------------------------------


@cli.command()
# A root that does not exist is a typo (or an unmounted disk): refuse it before anything in the library changes.
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@common_options
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip files or folders matching GLOB (repeatable).")
@click.option("--include-hidden", is_flag=True, help="Also index hidden files and folders.")
@click.option("--batch-size", type=click.IntRange(1, 4096), help="Images per encoder batch (default: 32 CPU, 256 GPU).")
@click.option("--workers", type=click.IntRange(0, 256),
              help="Decode workers: threads on a CPU, processes on a GPU; 0 = decode in the encoding thread "
                   "(default: one per core; on a GPU one per core but one; with --ray, processes per actor).")
@click.option("--device", help="cpu, cuda, cuda:N or mps (default: cuda when available).")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "openvino"]),
              help="Inference backend (default: the fastest faithful one, measured once per machine and model).")
@click.option("--precision", type=click.Choice(["fp32", "int8", "bf16", "fp16"]),
              help="Precision: fp32, int8 (onnxruntime), bf16 (openvino), fp16 (torch on CUDA) "
                   "(default: measured, as --backend).")
@click.option("--wait", type=float, default=0.0, help="Seconds to wait for another writer to finish.")
@click.option("--ray", metavar="ADDRESS",
              help="Decode and encode on a Ray cluster: 'auto' (the one `ray start` joined this machine to), "
                   "host:port or ray://host:10001. Needs pip install 'clipsearch[ray]'.")
@click.option("--memory-budget", type=MemorySize(), metavar="SIZE", help=MEMORY_BUDGET_HELP)
@click.option("--rebuild-index", is_flag=True, help="Also rebuild the FAISS index from the stored vectors.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's report as JSON.")
@click.pass_context
def index(ctx: click.Context, paths: tuple[Path, ...], as_json: bool, rebuild_index: bool, **options: Any) -> None:
    """Add the photos under PATHS to the library (incremental: only new or changed files are encoded)."""
    from clipsearch.cli_progress import IndexProgress
    from clipsearch.indexer.pipeline import IndexOptions, index_folders

    settings = _settings(ctx, options.pop("library"), options.pop("model"), options.pop("pretrained"))
    library = _create_library(settings["library"])
    stop = _stop_on_first_ctrl_c()
    with IndexProgress() as progress:
        report = index_folders(
            library, paths, model=_spec(settings), options=IndexOptions(**options), progress=progress, stop=stop
        )
    if rebuild_index:
        _rebuild(library, settings, options["memory_budget"])
    _print_index_report(report, as_json)
    if report.interrupted:
        click.echo("Stopped after the last committed batch; run the same command again to resume.", err=True)
        sys.exit(EXIT_INTERRUPTED)


def _stop_on_first_ctrl_c() -> threading.Event:
    """First Ctrl-C: finish the batch in hand, commit, stop. Second Ctrl-C: stop at once."""
    stop = threading.Event()

    def handler(_signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        click.echo("\nStopping after the current batch (Ctrl-C again to stop at once)...", err=True)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    return stop


def _print_index_report(report: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    for path, reason in report.failures[:20]:
        click.echo(f"  skipped {path}: {reason}", err=True)
    if len(report.failures) > 20:
        click.echo(f"  ... and {len(report.failures) - 20} more (see `clipsearch stats`)", err=True)
    click.echo(_summary_line(report))


def _summary_line(report: Any) -> str:
    if not (report.new or report.changed or report.moved or report.deleted or report.failures):
        return f"Nothing to encode: all {report.unchanged} images are up to date."
    parts = [
        f"{report.encoded} encoded ({report.new} new, {report.changed} changed)",
        f"{report.moved} moved",
        f"{report.deleted} removed",
        f"{report.unchanged} unchanged",
        f"{len(report.failures)} errors",
    ]
    speed = ""
    if report.encoded:
        encoder = f" ({report.backend} {report.precision})" if report.backend else ""
        speed = f"; {report.encode_ips:.1f} images/s encode{encoder}, {report.decode_ips:.1f} images/s decode"
    return f"Done in {report.elapsed:.1f}s: " + ", ".join(parts) + speed + "."


# --- search -------------------------------------------------------------------------------------------------


@cli.command()
@click.argument("query", required=False)
@common_options
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path), help="Query image (repeatable).")
@click.option("--image-weight", type=float, default=1.0, show_default=True, help="Weight of the query image(s).")
@click.option("-k", "--top", "k", type=int, default=10, show_default=True, help="Number of results.")
@click.option("--offset", type=click.IntRange(0), default=0, help="Skip this many results (paging).")
@click.option("--folder", type=click.Path(path_type=Path), help="Only photos under this folder.")
@click.option("--after", help="Only photos taken on or after this date (YYYY-MM-DD, or a time: "
                              "YYYY-MM-DDTHH:MM, with +HH:MM to mean an instant).")
@click.option("--before", help="Only photos taken on or before this date (YYYY-MM-DD; a time is exclusive).")
@click.option("--camera", help="Only photos whose camera make or model contains this text.")
@click.option("--format", "formats", multiple=True, help="Only this file format, e.g. JPEG (repeatable).")
@click.option("--min-score", type=float, help="Only results with at least this cosine similarity.")
@click.option("--separate-raw", is_flag=True,
              help="Show a RAW file and the JPEG beside it (same folder and name) as two results, not one.")
@click.option("--device", help="cpu, cuda, cuda:N or mps (default: cuda when available).")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "openvino"]),
              help="Inference backend for the query (default: the exported model without torch when cached).")
@click.option("--precision", type=click.Choice(["fp32", "int8", "bf16", "fp16"]),
              help="Precision of the image encoder for --image queries (default: this machine's measured choice).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of results.")
@click.pass_context
def search(ctx: click.Context, query: str | None, images: tuple[Path, ...], as_json: bool, **options: Any) -> None:
    """Find photos by text ("a red car -night 2:rain"), by --image, or both; best first with cosine scores."""
    from clipsearch.searcher import Searcher

    settings = _settings(ctx, options.pop("library"), options.pop("model"), options.pop("pretrained"))
    searcher = Searcher(settings["library"], model=settings["model"], pretrained=settings["pretrained"],
                        device=options.pop("device"), backend=options.pop("backend"),
                        precision=options.pop("precision"))
    results = searcher.query(query, image=[str(p) for p in images] or None, **options)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2, ensure_ascii=False))
        return
    if not results:
        click.echo("No results.", err=True)
    for result in results:
        also = f"  (also {', '.join(Path(p).name for p in result.other_paths)})" if result.other_paths else ""
        click.echo(f"{result.score:.4f}  {result.path}{also}")


# --- stats, reindex, ui -------------------------------------------------------------------------------------


@cli.command()
@common_options
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@click.pass_context
def stats(ctx: click.Context, as_json: bool, **options: Any) -> None:
    """How many photos are indexed, which failed and why, formats, model and index."""
    from clipsearch.searcher import Searcher

    settings = _settings(ctx, options.pop("library"), options.pop("model"), options.pop("pretrained"))
    facts = Searcher(settings["library"], model=settings["model"], pretrained=settings["pretrained"]).stats()
    if as_json:
        click.echo(json.dumps(facts, indent=2, ensure_ascii=False))
        return
    click.echo(_format_stats(facts))


def _format_stats(facts: dict[str, Any]) -> str:
    lines = [
        f"library:  {facts['library']}",
        f"model:    {facts['model']} ({facts['dim']}-d)",
        f"indexed:  {facts['indexed']}",
        "formats:  " + ", ".join(f"{k} {v}" for k, v in facts["by_format"].items()),
        f"errors:   {facts['errors']}",
        _format_encoder(facts.get("encoder")),
    ]
    lines += [f"  {e['path']}: {e['reason']}" for e in facts["error_list"][:50]]
    return "\n".join(lines + _format_index_facts(facts.get("index") or {}))


def _format_encoder(encoder: dict[str, Any] | None) -> str:
    if not encoder:
        return "encoder:  not measured on this machine yet (the next `clipsearch index` measures it)"
    return (f"encoder:  {encoder['backend']} {encoder['precision']} on this machine "
            f"({encoder['images_per_second']} images/s, min cosine {encoder['min_cosine']} to torch fp32)")


def _format_index_facts(index_facts: dict[str, Any]) -> list[str]:
    """The index's kind and size on one line, then each query kind's tuned parameters and measured recall."""
    if not index_facts:
        return ["index:    none yet"]
    facts = dict(index_facts)
    queries = facts.pop("queries", {})
    head = f"index:    {facts.pop('kind')} ({facts.pop('factory')}), {facts.pop('ntotal')} vectors, " \
           f"{facts.pop('bytes_per_vector')} bytes/vector"
    on_disk = facts.pop("on_disk", False)
    ivfdata_file, ivfdata_bytes = facts.pop("ivfdata_file", None), facts.pop("ivfdata_bytes", 0)
    lines = [head, "          " + ", ".join(f"{k}={v}" for k, v in facts.items())]
    if on_disk:
        lines.append(f"          on disk: lists in {ivfdata_file} ({ivfdata_bytes:,} bytes), memory-mapped")
    for kind, params in queries.items():
        lines.append(f"  {kind + ' queries:':17} " + ", ".join(f"{k}={v}" for k, v in params.items()))
    return lines


@cli.command()
@common_options
@click.option("--memory-budget", type=MemorySize(), metavar="SIZE", help=MEMORY_BUDGET_HELP)
@click.pass_context
def reindex(ctx: click.Context, memory_budget: int | None, **options: Any) -> None:
    """Rebuild the FAISS index from the stored vectors (nothing is re-encoded)."""
    settings = _settings(ctx, options.pop("library"), options.pop("model"), options.pop("pretrained"))
    from clipsearch.library import Library

    index_facts = _rebuild(Library.open(settings["library"]), settings, memory_budget)
    click.echo(f"Rebuilt the index: {index_facts}.")


def _rebuild(library: Any, settings: dict[str, Any], memory_budget: int | None = None) -> dict[str, Any]:
    from clipsearch.sync import refresh_index

    with library.writer_lock():
        spec = library.resolve_model(_spec(settings))
        encoder = _lazy_text_encoder(spec)
        index = refresh_index(library, encoder, rebuild=True, memory_budget_bytes=memory_budget)
    return index.describe() if index is not None else {}


def _lazy_text_encoder(spec: Any) -> Callable[[list[str]], Any]:
    """The text encoder is needed only to tune an approximate index; load the model only then."""
    from clipsearch.inference import load_text_encoder

    return lambda texts: load_text_encoder(spec).encode_texts(texts)


@cli.command()
@common_options
@click.option("--repair", is_flag=True, help="Fix what is found (nothing stored is re-encoded).")
@click.option("--json", "as_json", is_flag=True, help="Print {ok, problems, repaired} as JSON.")
@click.pass_context
def doctor(ctx: click.Context, repair: bool, as_json: bool, **options: Any) -> None:
    """Check the library: rows, vectors, index and files agree; --repair fixes what it finds."""
    from clipsearch import doctor as checks
    from clipsearch.library import Library

    settings = _settings(ctx, options.pop("library"), options.pop("model"), options.pop("pretrained"))
    library = Library.open(settings["library"])
    spec = library.resolve_model(_spec(settings))
    checkup = checks.repair(library, _lazy_text_encoder(spec)) if repair else checks.check(library)
    if as_json:
        click.echo(json.dumps(checkup.to_dict(), indent=2))
    else:
        click.echo(_format_checkup(checkup, repair))
    sys.exit(0 if checkup.ok else EXIT_ERROR)


def _format_checkup(checkup: Any, repaired: bool) -> str:
    lines = [f"repaired: {action}" for action in checkup.repaired]
    lines += [f"problem: {p.message}" for p in checkup.problems]
    if checkup.ok:
        lines.append("The library is healthy.")
    elif not repaired:
        lines.append("Run `clipsearch doctor --repair` to fix these.")
    return "\n".join(lines)


@cli.command()
@common_options
@click.option("--port", type=click.IntRange(1, 65535), default=8501, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--max-upload-mb", type=click.IntRange(1, 2000), default=20, show_default=True)
@click.pass_context
def ui(ctx: click.Context, port: int, host: str, max_upload_mb: int, **options: Any) -> None:
    """Open the search page in the browser (a local Streamlit server)."""
    import subprocess

    settings = _settings(ctx, options.pop("library"), options.pop("model"), options.pop("pretrained"))
    import clipsearch.ui

    app = Path(clipsearch.ui.__file__).resolve().parent / "app.py"
    env = _ui_environment(settings, max_upload_mb)
    command = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(port),
               "--server.address", host, "--server.headless", "true", "--browser.gatherUsageStats", "false",
               "--client.toolbarMode", "viewer",
               "--server.maxUploadSize", str(max_upload_mb)]
    click.echo(f"clipsearch is at http://{host}:{port}  (Ctrl-C to stop)", err=True)
    raise SystemExit(subprocess.call(command, env=env))


def _ui_environment(settings: dict[str, Any], max_upload_mb: int) -> dict[str, str]:
    env = dict(os.environ)
    for key, name in (("library", "CLIPSEARCH_LIBRARY"), ("model", "CLIPSEARCH_MODEL"),
                      ("pretrained", "CLIPSEARCH_PRETRAINED")):
        if settings[key]:
            env[name] = str(settings[key])
    env["CLIPSEARCH_MAX_UPLOAD_MB"] = str(max_upload_mb)
    return env


# --- helpers ------------------------------------------------------------------------------------------------


def _spec(settings: dict[str, Any]) -> Any:
    from clipsearch.model import ModelSpec

    return ModelSpec.parse(settings["model"], settings["pretrained"]) if settings["model"] else None


def _create_library(path: Path | None) -> Any:
    from clipsearch.library import Library

    return Library.create(path)


def main() -> None:
    # open_clip and huggingface_hub log download retries on the root logger; our errors say it in one sentence.
    logging.basicConfig(level=logging.CRITICAL if not os.environ.get("CLIPSEARCH_DEBUG") else logging.DEBUG)
    cli()
