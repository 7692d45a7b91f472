"""`tracekit` command line: a thin click layer over the Python API.

Exit codes: 0 ok, 1 findings worth failing a CI gate (e.g. ``attribute --fail-on``),
2 bad input (one line on stderr, never a traceback; TRACEKIT_DEBUG=1 shows it).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import TracekitError


class _Group(click.Group):
    """Turns every failure into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("tracekit: interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - the CLI's contract is one clear line
            if os.environ.get("TRACEKIT_DEBUG"):
                raise
            click.echo(f"tracekit: error: {_one_line(e)}", err=True)
            sys.exit(getattr(e, "exit_code", 2) if isinstance(e, TracekitError) else 2)

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """Usage errors too are one line (click's default prints usage + hint + error: 3 lines)."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `tracekit`: the help is the answer
                e.show()
                sys.exit(e.exit_code)
            hint = ""
            ctx = getattr(e, "ctx", None)
            if isinstance(e, click.UsageError) and ctx is not None:
                hint = f" (see '{ctx.command_path} --help')"
            click.echo(f"tracekit: error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("tracekit: aborted", err=True)
            sys.exit(1)
        # Non-standalone click returns Exit codes (--help, --version) as ints; commands return None.
        sys.exit(rv if isinstance(rv, int) else 0)


def _one_line(e: BaseException) -> str:
    from .store.reader import one_line

    msg = one_line(e)
    return msg if isinstance(e, TracekitError) else f"{type(e).__name__}: {msg}"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tracekit")
def cli() -> None:
    """Record vLLM RL rollouts, replay them on another engine, attribute the logprob drift."""


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(args=list(argv) if argv is not None else None, prog_name="tracekit")


class TraceLocation(click.ParamType):
    """A trace directory or a URI (s3://bucket/prefix, gs://..., any pyarrow filesystem).

    click.Path would fold 's3://b/p' into 's3:/b/p': a URI is passed through as a string and the
    store opens it (tracekit/store/location.py)."""

    name = "TRACE"

    def convert(self, value: Any, param: Any, ctx: Any) -> str | Path:
        from .store.location import is_uri

        if isinstance(value, Path) or not is_uri(value):
            return Path(value)
        return str(value)


TRACE = TraceLocation()
trace_arg = click.argument("trace", type=TRACE)


# ---------------------------------------------------------------------- render helpers
def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=False)


def emit_rows(cols: list[str], rows: list[tuple[Any, ...]], fmt: str, title: str | None = None) -> None:
    """Print query results as a rich table, CSV or JSON lines-free JSON array."""
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(cols)
        w.writerows(rows)
        click.echo(buf.getvalue(), nl=False)
    elif fmt == "json":  # strict JSON (jq, browsers): NaN → null, ±inf → "inf"/"-inf", nested too
        from .compare.metrics import json_safe

        click.echo(json.dumps([{c: json_safe(v) for c, v in zip(cols, r)} for r in rows], default=str, indent=1,
                              allow_nan=False))
    else:
        from rich.table import Table

        t = Table(title=title, show_lines=False)
        for c in cols:
            t.add_column(c, overflow="fold")
        for r in rows:
            t.add_row(*[_cell(v) for v in r])
        _console().print(t)


def _cell(v: Any) -> str:
    if v is None:
        return "[dim]NULL[/dim]"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


# ---------------------------------------------------------------------- info / validate
@cli.command()
@trace_arg
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def info(trace: Path, fmt: str) -> None:
    """What a trace holds: runs, engines, steps, requests, tokens, weights, replays, size."""
    from .store.info import info as get_info

    d = get_info(trace)
    if fmt == "json":
        click.echo(json.dumps(d, indent=2, default=str))
        return
    from rich.table import Table

    con = _console()
    con.print(f"[bold]trace[/bold] {d['path']}  (id {d['trace_id']}, format v{d['format_version']}, "
              f"created {d['created']} by tracekit {d['tracekit_version']})")
    bpt = f"{d['bytes_per_token']:.2f} B/token" if d["bytes_per_token"] else "-"
    con.print(
        f"runs {d['runs']} ({d['runs_not_closed']} not closed) · steps {d['steps']} "
        f"{d['step_range'] if d['steps'] else ''} · requests {d['requests']:,} · tokens {d['tokens']:,} · "
        f"trainer tokens {d['trainer_tokens']:,}"
    )
    con.print(
        f"weight versions used {d['weight_versions_used']} · snapshots {d['weight_snapshots']} · "
        f"syncs {d['weight_syncs']} · size {d['size_bytes'] / 1e6:.2f} MB · tokens table {bpt}"
    )
    if d["rows_dropped"]:
        con.print(f"[red]rows dropped by the recorder:[/red] {d['rows_dropped']}")
    if d["engines"]:
        # One column per engine, one row per fingerprint field: stays readable in 80 columns.
        t = Table(title="engines")
        t.add_column("field", style="bold")
        for e in d["engines"]:
            t.add_column(str(e["engine_id"])[:12], overflow="fold")
        for k in list(d["engines"][0])[1:]:
            t.add_row(k, *[_cell(e[k]) for e in d["engines"]])
        con.print(t)
    if d["replays"]:
        t = Table(title="replays")
        for k in ("name", "mode", "requests_ok", "requests_not_ok", "tokens", "overrides"):
            t.add_column(k, overflow="fold")
        for r in d["replays"]:
            t.add_row(*[_cell(r[k]) for k in ("name", "mode", "requests_ok", "requests_not_ok", "tokens", "overrides")])
        con.print(t)


@cli.command()
@trace_arg
@click.option("--quick", is_flag=True, help="Footers and schemas only; skip decoding every page.")
def validate(trace: Path, quick: bool) -> None:
    """Check schemas, keys, references and weight blob hashes. Exit 2 on any error."""
    from .store.validate import validate as run_validate

    findings = run_validate(trace, deep=not quick)
    errors = [f for f in findings if f.level == "error"]
    for f in findings:
        click.echo(f"{f.level}: {f.message}", err=f.level == "error")
    if errors:
        sys.exit(2)
    click.echo(f"ok: {trace} is a valid trace" + (f" ({len(findings)} warning(s))" if findings else ""))


# ---------------------------------------------------------------------- sql
@cli.command()
@trace_arg
@click.argument("query", required=False)
@click.option("--query", "-q", "name", help="Run a canned query by name (see --list).")
@click.option("--list", "list_", is_flag=True, help="List the canned queries.")
@click.option("--show", is_flag=True, help="Print the canned query's SQL instead of running it.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
def sql(trace: Path, query: str | None, name: str | None, list_: bool, show: bool, fmt: str) -> None:
    """Read-only SQL on the trace's DuckDB views. No QUERY: interactive shell (or SQL on stdin)."""
    from .compare import queries
    from .store.reader import Trace
    from .store.sql import run_query

    if list_:
        emit_rows(["name", "description"], [(q.name, q.description) for q in queries.all_queries()], fmt)
        return
    if name:
        q = queries.get(name)
        if show:
            click.echo(q.sql)
            return
        query = q.sql
    from .compare.views import connect

    t = Trace(trace)
    con = connect(t)
    if query is None and not sys.stdin.isatty():
        query = sys.stdin.read()
    if query is None:
        _shell(con, t.root, fmt)
        return
    cols, rows = run_query(con, query)
    emit_rows(cols, rows, fmt)


def _shell(con: Any, root: Path, fmt: str) -> None:
    """Minimal interactive shell with readline history; errors print and the shell goes on."""
    from .store.sql import run_query

    try:
        import readline

        hist = Path(os.environ.get("TRACEKIT_HISTORY", Path.home() / ".tracekit_history"))
        try:
            readline.read_history_file(hist)
        except OSError:
            pass
    except ImportError:  # pragma: no cover - Windows
        readline = None  # type: ignore[assignment]
    click.echo(f"tracekit sql on {root} (read-only). Views: "
               "requests, tokens, trainer, engines, weights, weight_syncs, runs, replays, replay_tokens, ...\n"
               "End statements with ';'. .tables lists views, .quit exits.")
    buf = ""
    while True:
        try:
            line = input("tracekit> " if not buf else "     ...> ")
        except EOFError:
            break
        if not buf and line.strip() in (".quit", ".exit", "\\q"):
            break
        if not buf and line.strip() == ".tables":
            line = "SELECT table_name, table_type FROM information_schema.tables ORDER BY 1;"
        buf += line + "\n"
        if not buf.strip().endswith(";"):
            continue
        try:
            cols, rows = run_query(con, buf)
            emit_rows(cols, rows, fmt)
        except TracekitError as e:
            click.echo(f"error: {e}", err=True)
        buf = ""
    if readline is not None:
        try:
            readline.write_history_file(hist)
        except OSError:
            pass


# ---------------------------------------------------------------------- schema
@cli.command("schema")
@click.option("--markdown", is_flag=True, help="The trace format reference as Markdown (docs/trace-format.md).")
def schema_cmd(markdown: bool) -> None:
    """Print the trace format declared in schemas/ (JSON by default)."""
    from . import schema as sch

    if markdown:
        click.echo(sch.markdown(), nl=False)
        return
    click.echo(json.dumps({"format_version": sch.FORMAT_VERSION, "tables": {
        t.name: {"path": t.path, "version": t.version, "hash": t.hash,
                 "columns": {c.name: c.type for c in t.columns}} for t in sch.tables().values()}}, indent=2))


# ---------------------------------------------------------------------- weights
@cli.group()
def weights() -> None:
    """Weight snapshots stored in a trace."""


@weights.command("ls")
@trace_arg
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
def weights_ls(trace: Path, fmt: str) -> None:
    """One line per stored version: tensors, bytes, new blobs."""
    from .store.reader import Trace

    cols, rows = _q(Trace(trace),
        "SELECT version, any_value(step) AS step, count(*) AS tensors, sum(nbytes) AS bytes, "
        "min(created_at) AS created_at FROM weights GROUP BY version ORDER BY version")
    emit_rows(cols, rows, fmt, title="weight snapshots")


@weights.command("verify")
@trace_arg
def weights_verify(trace: Path) -> None:
    """Check every blob exists, is safetensors and matches its sha256. Exit 2 if not."""
    from .store.reader import Trace
    from .store.weights import verify

    problems = verify(Trace(trace))
    for p in problems:
        click.echo(f"error: {p}", err=True)
    if problems:
        sys.exit(2)
    click.echo("ok: all weight blobs verified")


@weights.command("export")
@trace_arg
@click.argument("version", type=int)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--like", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Model directory whose config/tokenizer files are copied beside the weights.")
def weights_export(trace: Path, version: int, out_dir: Path, like: Path | None) -> None:
    """Write VERSION as OUT/model.safetensors (verified), loadable by vLLM."""
    from .store.reader import Trace
    from .store.weights import export_snapshot

    p = export_snapshot(Trace(trace), version, out_dir, like=like)
    click.echo(str(p))


def _q(t: Any, sql_text: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    from .compare.views import connect
    from .store.sql import run_query

    return run_query(connect(t), sql_text)


# ---------------------------------------------------------------------- diff / attribute
# The grouping keys of the comparison views (tracekit.compare.views.AGG_KEYS).
by_option = click.option("--by", default="step", show_default=True,
                         type=click.Choice(["step", "request", "position", "weight_version", "group", "sampling",
                                            "temperature", "cache_hit", "all"]))


@cli.command()
@trace_arg
@click.option("--a", "a", default="recorded", show_default=True,
              help="Source a: recorded, trainer, replay:NAME or replay:NAME:processed.")
@click.option("--b", "b", default="trainer", show_default=True, help="Source b (Δ = a − b).")
@by_option
@click.option("--eps", type=float, default=0.2, show_default=True, help="Clip range: |ratio − 1| > eps.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
def diff(trace: Path, a: str, b: str, by: str, eps: float, fmt: str) -> None:
    """Per-token Δ between two logprob sources, aggregated: ratio, clip rate, GSPO, k1/k3, entropy."""
    from .compare.metrics import diff as run_diff
    from .compare.metrics import finite_or_str

    cols, rows = run_diff(trace, a, b, by=by, eps=eps)
    rows = [tuple(finite_or_str(v) for v in r) for r in rows]
    if fmt != "table":
        emit_rows(cols, rows, fmt)
        return
    from rich.console import Console
    from rich.table import Table

    keep = [i for i, c in enumerate(cols) if i == 0 or any(r[i] is not None for r in rows)]  # drop all-NULL
    t = Table(title=f"Δ = {a} − {b} by {by} (eps {eps})")
    for i in keep:
        t.add_column(cols[i], justify="right" if i else "left")
    for r in rows:
        t.add_row(*[f"{r[i]:.4g}" if isinstance(r[i], float) else _cell(r[i]) for i in keep])
    con = Console(soft_wrap=False)
    con.width = max(con.width, 160)  # a wide table beats folded digits when piped
    con.print(t)


@cli.command("metrics")
@trace_arg
@click.option("--a", "a", default="recorded", show_default=True,
              help="Rollout side (behaviour/old policy: the engine that sampled): recorded, trainer, replay:NAME[:processed].")
@click.option("--b", "b", default="trainer", show_default=True, help="Training side (the policy the trainer scores with).")
@by_option
@click.option("--style", default="all", show_default=True, type=click.Choice(["verl", "slime", "pipelinerl", "trl", "all"]),
              help="Whose metrics, under their own names (docs/metrics.md).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
def metrics_cmd(trace: Path, a: str, b: str, by: str, style: str, fmt: str) -> None:
    """verl, slime, PipelineRL and TRL mismatch metrics of a (rollout) vs b (training), per group."""
    from .compare.anchors import STYLES, anchor_metrics, metrics_for, threshold
    from .compare.metrics import finite_or_str

    cols, rows = anchor_metrics(trace, a, b, by=by, style=style)
    rows = [tuple(finite_or_str(v) for v in r) for r in rows]
    if fmt != "table":
        emit_rows(cols, rows, fmt)
        return
    from rich.markup import escape
    from rich.table import Table

    con = _console()
    con.width = max(con.width, 160)
    for s in STYLES if style == "all" else (style,):  # one table per stack: a row per metric, a column per group
        t = Table(title=f"{s}: a = {a} (rollout), b = {b} (training), by {by}")
        t.add_column("metric")
        for r in rows:
            t.add_column(f"{cols[0]} {_cell(r[0])}", justify="right")
        t.add_column("threshold", overflow="fold")
        for name, thr in [(c, "") for c in cols[1:4]] + [(m.name, threshold(m) or "") for m in metrics_for(s)]:
            i = cols.index(name)
            t.add_row(escape(name), *[f"{r[i]:.4g}" if isinstance(r[i], float) else _cell(r[i]) for r in rows],
                      escape(thr))
        con.print(t)


def _fail_on_choice(value: str | None) -> str | None:
    from .causes import cause_ids
    from .compare.engines import FIELDS

    settings = value is not None and (value in FIELDS or value.split(".", 1)[0] in FIELDS)
    if value is not None and value not in ("any", "version") and value not in cause_ids() and not settings:
        raise click.BadParameter(f"{value!r} is not 'any', 'version', an engine setting ({', '.join(FIELDS)}) "
                                 f"or a cause: {', '.join(cause_ids())}")
    return value


@cli.command()
@trace_arg
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("--fail-on", "fail_on", callback=lambda ctx, p, v: _fail_on_choice(v),
              help="Exit 1 when this cause (or 'any') is present, or, with --gate, when the migration "
                   "gate is exceeded and this changed setting (or 'version') is to blame.")
@click.option("--no-replay", is_flag=True, help="Use only recorded data and replays that already exist.")
@click.option("--python", "python", type=click.Path(exists=True, dir_okay=False),
              help="Interpreter of the new engine (another venv / vLLM version): the ladder's replays run "
                   "there and the migration audit splits the recorded-vs-new gap by changed setting.")
@click.option("--engine-arg", "engine_arg", multiple=True, metavar="KEY=VALUE",
              help="A setting of the new engine for the migration audit (vLLM's own name).")
@click.option("--hf-override", "hf_override", multiple=True, metavar="KEY=VALUE",
              help="An hf_overrides entry of the new engine for the migration audit.")
@click.option("--gate", metavar="METRIC=VALUE",
              help="Migration gate on recorded vs new: mean_abs_delta, max_abs_delta, clip_rate, seq_clip_rate "
                   "or k3, e.g. clip_rate=0.01.")
@click.option("--model", type=click.Path(exists=True, file_okay=False),
              help="Model directory, when the recorded path does not exist on this machine.")
@click.option("--eps", type=float, default=0.2, show_default=True, help="Clip range for the reported metrics.")
def attribute(trace: Path, fmt: str, fail_on: str | None, no_replay: bool, python: str | None,
              engine_arg: tuple[str, ...], hf_override: tuple[str, ...], gate: str | None,
              model: str | None, eps: float) -> None:
    """Name the cause(s) of the recorded-vs-trainer logprob gap, with evidence, share and fix; with
    --python (or --engine-arg), split the recorded-vs-new-engine gap by changed setting."""
    from .attribute import Thresholds, check_fail_on, render
    from .attribute import attribute as run_attribute
    from .migration import parse_gate
    from .replay import parse_kv

    try:
        g = parse_gate(gate)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    ea, hf = parse_kv(engine_arg), parse_kv(hf_override, "--hf-override")
    res = run_attribute(trace, replay=not no_replay, python=python, model=model,
                        thresholds=Thresholds(eps=eps), progress=fmt == "table" and sys.stderr.isatty(),
                        migration=bool(python or ea or hf), engine_args=ea, hf_overrides=hf, gate=g)
    if fmt == "json":
        click.echo(json.dumps(res.as_dict(), indent=1, default=str))
    else:
        from rich.console import Console

        con = Console(soft_wrap=False)
        con.width = max(con.width, 140)
        render(res, con)
    if check_fail_on(res, fail_on):
        sys.exit(1)


# ---------------------------------------------------------------------- replay
@cli.command("replay")
@trace_arg
@click.option("--name", required=True, help="Replay name: results go to TRACE/replays/NAME/.")
@click.option("--python", "python", help="Interpreter of the target venv (default: this one).")
@click.option("--engine-arg", "engine_arg", multiple=True, metavar="KEY=VALUE",
              help="vLLM engine arg override, vLLM's own name (VALUE parsed as JSON when it parses).")
@click.option("--hf-override", "hf_override", multiple=True, metavar="KEY=VALUE",
              help="hf_overrides entry, e.g. head_dtype=float32.")
@click.option("--mode", type=click.Choice(["score", "regenerate", "forced", "reference"]), default="score",
              show_default=True)
@click.option("--model", help="Model path to use when the recorded one does not exist here.")
@click.option("--shard", metavar="I/N", help="Replay only shard I of N (0-based; deterministic by request id).")
@click.option("--limit", type=int, help="Replay at most N requests in this run.")
@click.option("--resume", is_flag=True, help="Continue an interrupted replay of the same name.")
@click.option("--allow-missing-weights", is_flag=True,
              help="Skip (and count) requests whose weight version has no snapshot.")
@click.option("--chunk-requests", type=int, default=64, show_default=True,
              help="Requests per engine batch; each batch is committed (tokens, then ledger) as a unit.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run the shards as Ray tasks (docs/scale.md). Alone: the cluster in RAY_ADDRESS or started "
                   "here with `ray start`, else a new local one; or 'auto', HOST:PORT, ray://HOST:PORT.")
@click.option("--shards", type=click.IntRange(min=1), metavar="K",
              help="With --ray: number of shards [default: as many as the cluster runs at once].")
@click.option("--num-gpus-per-shard", type=click.FloatRange(min=0), metavar="G",
              help="With --ray: GPUs per shard, one engine each (G > 1: tensor parallel over them) [default: 0].")
@click.option("--num-cpus-per-shard", type=click.FloatRange(min=0), metavar="C",
              help="With --ray: CPUs Ray reserves per shard [default: 1].")
def replay_cmd(trace: Path, name: str, python: str | None, engine_arg: tuple[str, ...], hf_override: tuple[str, ...],
               mode: str, model: str | None, shard: str | None, limit: int | None, resume: bool,
               allow_missing_weights: bool, chunk_requests: int, no_progress: bool, ray_address: str | None,
               shards: int | None, num_gpus_per_shard: float | None, num_cpus_per_shard: float | None) -> None:
    """Re-execute the trace's requests on a (possibly other) vLLM, per recorded weight version."""
    from .replay import parse_kv, replay

    common = dict(python=python, engine_args=parse_kv(engine_arg, "--engine-arg"),
                  hf_overrides=parse_kv(hf_override, "--hf-override"), mode=mode, resume=resume,
                  allow_missing_weights=allow_missing_weights, progress=not no_progress, model=model,
                  chunk_requests=chunk_requests)
    ray_opts = {"--shards": shards, "--num-gpus-per-shard": num_gpus_per_shard, "--num-cpus-per-shard": num_cpus_per_shard}
    if ray_address is None:
        given = [k for k, v in ray_opts.items() if v is not None]
        if given:
            raise click.UsageError(f"{given[0]} needs --ray (one machine: --shard I/N per process)")
        res = replay(trace, name, shard=shard, limit=limit, **common)  # type: ignore[arg-type]
    else:
        for opt, v in (("--shard", shard), ("--limit", limit)):
            if v is not None:
                raise click.UsageError(f"{opt} and --ray together: --ray runs every shard (--shards K)")
        from .replay.cluster import replay_on_ray

        res = replay_on_ray(trace, name, address=ray_address or None, shards=shards,
                            num_gpus_per_shard=num_gpus_per_shard or 0,
                            num_cpus_per_shard=1 if num_cpus_per_shard is None else num_cpus_per_shard,
                            **common)  # type: ignore[arg-type]
    click.echo(
        f"replay {res.name} ({res.mode}, vLLM {res.target_vllm or '-'}): {res.requests_ok} ok, "
        f"{res.requests_error} error, {res.requests_skipped} skipped, {res.requests_already_done} already done; "
        f"{res.tokens:,} tokens in {res.seconds:.1f} s → {res.path}"
    )
    for n in res.notes:
        click.echo(f"note: {n}")


# ---------------------------------------------------------------------- record / proxy
@cli.command("record", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--out", "out", type=TRACE, required=True, help="Trace directory (or s3://bucket/prefix) to write.")
@click.option("--snapshot-every", type=int, default=1, show_default=True,
              help="Store a weight snapshot every N versions pushed through the recorder (0: never).")
@click.option("--flush-interval", type=float, default=1.0, show_default=True,
              help="Seconds between part flushes (what a kill -9 can lose at most).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def record_cmd(out: Path, snapshot_every: int, flush_interval: float, command: tuple[str, ...]) -> None:
    """Run COMMAND (after --) and record every vLLM LLM/AsyncLLM it builds, with no code change."""
    from .capture.launch import record_command

    rc = record_command(list(command), out, snapshot_every=snapshot_every, flush_interval=flush_interval)
    sys.exit(rc if rc >= 0 else 128 - rc)


@cli.command("proxy")
@click.option("--upstream", required=True, help="Base URL of the vLLM OpenAI server, e.g. http://127.0.0.1:8000.")
@click.option("--listen", default="127.0.0.1:8100", show_default=True, help="HOST:PORT to serve on.")
@click.option("--out", "out", type=TRACE, required=True, help="Trace directory (or s3://bucket/prefix) to write.")
@click.option("--engine-args", "engine_args", type=click.Path(path_type=Path),
              help="JSON (or YAML) file with the server's engine args (logprobs_mode, dtype, ...).")
@click.option("--flush-interval", type=float, default=1.0, show_default=True)
def proxy_cmd(upstream: str, listen: str, out: Path, engine_args: Path | None, flush_interval: float) -> None:
    """OpenAI-compatible recording proxy: clients talk to --listen, requests go to --upstream."""
    from .capture.proxy import run_proxy

    st = run_proxy(upstream, listen, out, engine_args_file=str(engine_args) if engine_args else None,
                   flush_interval=flush_interval)
    msg = f"tracekit proxy: closed; rows written {st.rows_written}"
    if st.dropped:
        msg += f"; DROPPED {st.rows_dropped}"
    click.echo(msg, err=True)


# ---------------------------------------------------------------------- report
@cli.command("report")
@trace_arg
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Directory for report.html and the PNG figures.")
@click.option("--attribution", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="JSON from `tracekit attribute TRACE --format json` (default: attribute the trace "
                   "from its recorded data and existing replays, without starting an engine).")
@click.option("--no-attribution", is_flag=True, help="Leave the attribution section out.")
@click.option("--eps", type=float, default=0.2, show_default=True, help="Clip range for the curves.")
def report_cmd(trace: Path, out_dir: Path, attribution: Path | None, no_attribution: bool, eps: float) -> None:
    """Self-contained HTML report plus PNG figures: RL curves per source, Δ distribution, waterfall."""
    from .report import write_report

    paths = write_report(trace, out_dir, attribution=attribution, compute_attribution=not no_attribution, eps=eps)
    for name, p in paths.items():
        click.echo(f"{name}: {p}")


# ---------------------------------------------------------------------- import
@cli.group("import")
def import_group() -> None:
    """Import rollout dumps another RL stack wrote (runs recorded before tracekit) into a trace."""


def _import_command(stack: str, src_help: str) -> None:
    @import_group.command(stack, help=f"Import {src_help} into a new trace at --out (docs/import.md).")
    @click.argument("src", type=click.Path(path_type=Path))
    @click.option("--out", "out", type=TRACE, required=True,
                  help="Trace directory to create (must not exist; written atomically).")
    @click.option("--model", type=click.Path(exists=True, file_okay=False),
                  help="Model directory: its tokenizer tokenizes text-only sources, its generation_config "
                       "resolves sampling defaults, and replay uses it.")
    @click.option("--config", "config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="The run's config file (YAML or JSON) when it is not found beside SRC.")
    def cmd(src: Path, out: Path, model: str | None, config: Path | None) -> None:
        from .importers import import_run

        r = import_run(stack, src, out, model=model, config=config)
        click.echo(f"imported {r.source_format} ({len(r.files)} file(s)): {r.requests:,} requests, "
                   f"{r.tokens:,} tokens in {r.seconds:.1f} s → {r.path}")
        nulls = [k for k in r.null_fields if k.startswith(("requests.", "tokens.")) or "." not in k]
        click.echo(f"null (reasons in trace.json 'import'): {', '.join(nulls)}")
        for n in r.notes:
            click.echo(f"note: {n}")


for _stack, _help in (("pipelinerl", "a PipelineRL run (experiment dir, streams/ dir or one actor .jsonl stream)"),
                      ("slime", "slime --save-debug-rollout-data files (one .pt file or a directory of them)"),
                      ("trl", "TRL GRPOTrainer completions (output_dir, its completions/ dir or one .parquet)"),
                      ("verl", "verl rollout_data_dir / validation_data_dir dumps (a directory or one .jsonl)")):
    _import_command(_stack, _help)


# ---------------------------------------------------------------------- demo
@cli.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True,
              help="Directory for the model, trace, attribution and report (absent or empty).")
@click.option("--new-python", help="Interpreter of the venv holding the 'new' vLLM (default: this one).")
@click.option("--fault", "faults", multiple=True,
              type=click.Choice(["logprob_mode", "runtime_defaults", "weight_sync", "lm_head_precision"]),
              help="Fault to plant in the recorded run (repeatable; default: logprob_mode + lm_head_precision).")
@click.option("--clean", is_flag=True, help="Plant no fault: attribution should find nothing.")
@click.option("--steps", type=int, default=4, show_default=True)
def demo(out: Path, new_python: str | None, faults: tuple[str, ...], clean: bool, steps: int) -> None:
    """Record a toy GRPO job on vLLM, replay it on another engine, attribute, report."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the demo's own lines tell the story
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process, like the toy job: ~20 s less
    from rich.console import Console

    from .attribute import render
    from .demo.pipeline import DEFAULT_FAULTS, run_demo

    planted = () if clean else (faults or DEFAULT_FAULTS)
    res = run_demo(out, faults=planted, new_python=new_python, steps=steps,
                   log=lambda s: click.echo(s, err=True))
    con = Console(soft_wrap=False)
    con.width = max(con.width, 140)
    render(res.result, con)
    verdict = "matches" if res.correct else "DOES NOT match"
    con.print(f"\n[bold]verdict:[/bold] found {', '.join(res.found) or 'nothing'}; planted "
              f"{', '.join(res.planted) or 'nothing'} — attribution {verdict} the planted faults.")
    con.print(f"trace:       {res.trace}\nattribution: {res.out / 'attribution.json'}\n"
              f"report:      {res.report.get('html', res.out / 'report')}")
    con.print("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in res.timings.items()))
    if not res.correct:
        sys.exit(1)


@cli.command("doctor")
def doctor_cmd() -> None:
    """What this host needs to run vLLM engines: CPU flags, versions, AMX init and its recipe."""
    from .doctor import checks

    rows = checks()
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{w}}  {v}")


if __name__ == "__main__":  # pragma: no cover
    main()
