"""The ``streamshard`` command: ``convert``, ``inspect``, ``verify``, ``merge``, ``demo``,
``explain`` (streamshard/cli_explain.py), ``quarantine`` (streamshard/cli_quarantine.py).

Each subcommand is a pair ``_add_NAME(subparsers)`` / ``_cmd_NAME(args) -> exit code``; adding one
means writing that pair and listing it in ``_SUBCOMMANDS``. Exit codes: 0 success; 1 a runtime
error (bad input, existing dataset, corruption found by ``verify``); 2 a usage error (argparse, or
a ``ConfigError`` such as an option the format does not take); 130 interrupted. Errors print one
line (``streamshard: error: ...``); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable, Sequence

from streamshard.errors import ConfigError, StreamshardError, redact
from streamshard.preview import preview
from streamshard.progress import ProgressBar, format_duration
from streamshard.sizes import format_size

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# -- convert ---------------------------------------------------------------------------------

def _add_convert(sub: Any) -> None:
    import streamshard.converters as converters
    from streamshard.writer import DEFAULT_BLOCK_SIZE, DEFAULT_COMPRESSION_LEVEL, DEFAULT_SHARD_SIZE

    formats = converters.available()
    p = sub.add_parser("convert", help="convert input files into a streamshard dataset",
                       description="Convert SRC files, directories (recursed, sorted) or globs "
                                   "into the dataset DEST (a directory or fsspec URL).")
    _add_paths(p, "SRC", "input file, directory or glob", "the dataset to write")
    p.add_argument("--format", required=True, choices=sorted(formats),
                   help="input format: " + "; ".join(f"{n}: {c.help}"
                                                     for n, c in sorted(formats.items())))
    p.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE,
                   help=f"target shard size (default {DEFAULT_SHARD_SIZE // 10**6}MB)")
    p.add_argument("--block-size", default=DEFAULT_BLOCK_SIZE,
                   help=f"raw bytes per block (default {DEFAULT_BLOCK_SIZE // 2**10}KiB)")
    p.add_argument("--compression", default="zstd", choices=("zstd", "none"))
    p.add_argument("--compression-level", type=int, default=DEFAULT_COMPRESSION_LEVEL)
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1); "
                   "the dataset is identical for every value")
    p.add_argument("--chunk-size", default=None, help="input bytes per chunk, the unit of "
                   "parallel work and of resume (default 64MB; part of the output layout)")
    p.add_argument("--skip-errors", action="store_true",
                   help="skip and count malformed records instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    p.add_argument("--input-cache", metavar="DIR", help="where remote SRC URLs (s3://, https://, "
                   "hf://, globs too) are staged and kept (default: a temp dir removed after "
                   "success); see docs/CONVERT.md")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="continue an unfinished conversion with the same arguments (default: "
                        "on when DEST has one); --no-resume discards it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    group = p.add_argument_group("format options")
    seen: dict[str, list[str]] = {}
    for name, conv in sorted(formats.items()):
        for opt in conv.options:
            seen.setdefault(opt.flag, []).append(name)
    for flag, users in seen.items():
        opt = next(o for o in formats[users[0]].options if o.flag == flag)
        kwargs: dict[str, Any] = {"default": None, "help": opt.help}
        if not opt.is_flag and not opt.choices:
            kwargs["metavar"] = opt.dest.upper()
        if opt.is_flag:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=opt.type, choices=opt.choices)
        group.add_argument(flag, dest=f"fmt_{opt.dest}", **kwargs)
    pack = p.add_argument_group(
        "tokenize and pack for LLM pretraining (either --tokenizer or --token-field; sequences of "
        "--seq-len tokens across document boundaries; --workers and resume apply; see "
        "docs/CONVERTERS.md)")
    pack.add_argument("--tokenizer", dest="pack_tokenizer", metavar="PATH",
                      help="local Hugging Face tokenizer.json (or its directory)")
    pack.add_argument("--token-field", dest="pack_token_field", metavar="NAME",
                      help="field holding pre-tokenized ids")
    pack.add_argument("--text-field", dest="pack_text_field", default="text", metavar="NAME",
                      help="field holding the text to tokenize (default text)")
    pack.add_argument("--eod-id", dest="pack_eod_id", type=int,
                      help="end-of-document token id (default: the tokenizer's)")
    pack.add_argument("--pad-id", dest="pack_pad_id", type=int,
                      help="pad id of the last sequence (default: the eod id)")
    pack.add_argument("--doc-boundaries", dest="pack_doc_boundaries", action="store_true",
                      help="add doc_starts: uint32[] (document starts inside each sequence)")
    pack.add_argument("--token-dtype", dest="pack_token_dtype", choices=("uint16", "uint32"))
    if "--seq-len" not in seen:
        group.add_argument("--seq-len", dest="fmt_seq_len", type=int, default=None)
        seen["--seq-len"] = []
    p.set_defaults(func=_cmd_convert, option_dests=[f"fmt_{o.lstrip('-').replace('-', '_')}"
                                                    for o in seen])


def _cmd_convert(args: argparse.Namespace) -> int:
    *sources, dest = args.paths
    options = {d[4:]: getattr(args, d) for d in args.option_dests if getattr(args, d) is not None}
    if args.pack_tokenizer or args.pack_token_field:
        return _cmd_pack(args, sources, dest, options)
    s = _run_convert(args, sources, dest, options, label="convert")
    print(f"converted {s.samples:,} samples into {s.shards:,} shards ({s.chunks} chunks, "
          f"{s.reused_chunks} reused) in {format_duration(s.seconds)} ({s.seconds:.2f} s)")
    print(f"input {format_size(s.input_bytes)}, {s.mb_per_s:.1f} MB/s; raw "
          f"{format_size(s.raw_bytes)} -> stored {format_size(s.stored_bytes)} "
          f"(ratio {s.ratio:.2f})")
    for name, value in sorted(s.counters.items()):
        hint = " (shorter than --seq-len; pass --keep-tail to keep them)" \
            if name == "dropped_tokens" else ""
        print(f"{name.replace('_', ' ')}: {value:,}{hint}")
    if s.skipped:
        print(f"skipped {s.skipped:,} malformed records; first ones:")
        for example in s.skipped_examples:
            print(f"  {example}")
    print(f"fingerprint {s.fingerprint}")
    print(f"dataset {dest}")
    return EXIT_OK


def _run_convert(args: argparse.Namespace, sources: list[str], dest: str, options: dict, *,
                 label: str, packing: Any = None) -> Any:
    """``convert`` with the CLI's arguments, a progress bar named ``label`` and a resume line:
    the one call behind both ``convert`` and ``convert --tokenizer/--token-field``."""
    from streamshard.convert import convert

    bar: list[ProgressBar] = []

    def on_start(chunks: int, reused: int, nbytes: int) -> None:
        if reused:
            print(f"resuming: {reused} of {chunks} chunks already done", file=sys.stderr)
        bar.append(ProgressBar(nbytes, label=label, enabled=not args.quiet))

    try:
        return convert(sources, dest, format=args.format, options=options,
                       shard_size=args.shard_size, block_size=args.block_size,
                       compression=args.compression, compression_level=args.compression_level,
                       workers=args.workers, chunk_size=args.chunk_size or "64MB",
                       skip_errors=args.skip_errors, overwrite=args.overwrite, resume=args.resume,
                       input_cache=args.input_cache, packing=packing,
                       progress=lambda n, b: bar[0].update(n, b) if bar else None,
                       on_start=on_start)
    finally:
        if bar:
            bar[0].close()


def _cmd_pack(args: argparse.Namespace, sources: list[str], dest: str, options: dict) -> int:
    from streamshard.convert_packing import make_spec, stats_of

    seq_len = options.pop("seq_len", None)
    if not seq_len:
        raise ConfigError("packing needs --seq-len (tokens per sequence)")
    spec = make_spec(seq_len=seq_len, tokenizer=args.pack_tokenizer,
                     text_field=args.pack_text_field, token_field=args.pack_token_field,
                     eod_id=args.pack_eod_id, pad_id=args.pack_pad_id,
                     doc_boundaries=args.pack_doc_boundaries,
                     token_dtype_name=args.pack_token_dtype)
    s = _run_convert(args, sources, dest, options, label="tokenize", packing=spec)
    stats = stats_of(s)
    print(f"packed {stats.documents:,} documents ({stats.tokens:,} tokens) into "
          f"{stats.sequences:,} sequences of {seq_len} in {stats.seconds:.2f} s; "
          f"{stats.padded_tokens:,} pad tokens in the last one; {stats.skipped:,} records skipped")
    print(f"{s.shards:,} shards ({s.chunks} chunks, {s.reused_chunks} reused); "
          f"fingerprint {s.fingerprint}")
    for example in s.skipped_examples:
        print(f"  skipped: {example}")
    print(f"dataset {dest}")
    return EXIT_OK


# -- inspect ---------------------------------------------------------------------------------

def _add_inspect(sub: Any) -> None:
    p = sub.add_parser("inspect", help="show a dataset's schema, sizes and a few samples")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("--samples", type=int, default=3, help="samples to preview (default 3)")
    from streamshard import cli_inspect

    cli_inspect.add_options(p)
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from streamshard.reader import open_dataset

    from streamshard import cli_inspect

    if cli_inspect.wanted(args):
        with open_dataset(args.dest) as ds:
            cli_inspect.run(args, ds, preview)
        return EXIT_OK
    with open_dataset(args.dest) as ds:
        idx = ds.index
        raw = sum(s.raw_bytes for s in idx.shards)
        stored = sum(s.bytes for s in idx.shards)
        level = f" (level {idx.compression_level})" if idx.compression else ""
        print(f"dataset     {args.dest}")
        print(f"fingerprint {idx.fingerprint}")
        print(f"samples     {idx.num_samples:,}")
        print(f"shards      {idx.num_shards:,} (target {format_size(idx.shard_size)}, "
              f"blocks {format_size(idx.block_size)})")
        print(f"compression {idx.compression or 'none'}{level}")
        print(f"size        raw {format_size(raw)}, stored {format_size(stored)}, ratio "
              f"{raw / stored if stored else 1.0:.2f}")
        print("columns")
        for name, typ in ds.schema.to_json().items():
            print(f"  {name}: {typ}")
        if idx.metadata:
            print(f"metadata    {preview(idx.metadata, 200)}")
        for i in range(min(max(args.samples, 0), len(ds))):
            print(f"sample {i}")
            for name, value in ds[i].items():
                print(f"  {name}: {preview(value)}")
    return EXIT_OK


# -- verify ----------------------------------------------------------------------------------

def _add_verify(sub: Any) -> None:
    p = sub.add_parser("verify", help="check every checksum; exit 1 on any corruption")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_verify)


def _stored_bytes(dest: str) -> int:
    """Total shard bytes for the progress bar's ETA; 0 (unknown) when the index is unreadable,
    which verify_dataset then reports properly."""
    from streamshard.reader import open_dataset

    try:
        with open_dataset(dest) as ds:
            return sum(s.bytes for s in ds.index.shards)
    except StreamshardError:
        return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from streamshard.verify import verify_dataset

    bar = ProgressBar(_stored_bytes(args.dest), label="verify", unit="shards",
                      enabled=not args.quiet)
    with bar:
        report = verify_dataset(args.dest, progress=lambda info: bar.update(1, info.bytes))
    for problem in report.problems:
        print(f"CORRUPT {problem}")
    state = "ok" if report.ok else f"FAILED with {len(report.problems)} problem(s)"
    print(f"{state}: {report.shards_checked} shards, {report.blocks_checked} blocks, "
          f"{report.samples_checked:,} samples checked")
    return EXIT_OK if report.ok else EXIT_FAIL


# -- merge -----------------------------------------------------------------------------------

def _add_merge(sub: Any) -> None:
    p = sub.add_parser("merge", help="one index over part datasets inside DEST (no data copied)")
    _add_paths(p, "PART", "a part dataset inside DEST", "the dataset whose index is written")
    p.add_argument("--overwrite", action="store_true", help="replace DEST's existing index")
    p.set_defaults(func=_cmd_merge)


def _cmd_merge(args: argparse.Namespace) -> int:
    from streamshard.merge import merge_datasets

    *parts, dest = args.paths
    index = merge_datasets(parts, dest, overwrite=args.overwrite)
    print(f"merged {len(parts)} parts: {index.num_samples:,} samples in {index.num_shards:,} "
          f"shards; fingerprint {index.fingerprint}")
    return EXIT_OK


# -- demo ------------------------------------------------------------------------------------

def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="end to end on the Python standard library's source files: "
                                    "convert, inspect, verify, shuffled read, resume")
    p.add_argument("--out", default=None, help="keep the dataset here (default: a temp dir)")
    p.add_argument("--workers", type=int, default=2, help="conversion and DataLoader workers")
    p.add_argument("--source", default=None, help="a directory of text files (default: stdlib)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from streamshard import demo

    out = args.out or tempfile.mkdtemp(prefix="streamshard-demo-")
    try:
        return demo.run(out, cli=main, workers=args.workers, source=args.source)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


# -- plan (streamshard/capacity.py) ------------------------------------------------------------

def _add_plan(sub: Any) -> None:
    from streamshard import capacity  # implementation and options live there

    capacity.add_parser(sub)
    sub.choices["plan"].set_defaults(func=capacity.run)


# -- launch (streamshard/recovery/launch.py; takes torchrun's own flags, parsed there) ----------

def _add_launch(sub: Any) -> None:
    sub.add_parser("launch", add_help=False, help="torchrun's elastic agent acting on recovery exit codes "
                                                  "(75 restart, 77 drop node, 78 stop all); torchrun flags")


# -- entry point -----------------------------------------------------------------------------

def _add_paths(p: argparse.ArgumentParser, name: str, help: str, dest_help: str) -> None:
    """``NAME [NAME ...] DEST`` positionals (usage reads so); ``main`` joins them in
    ``args.paths`` (the last one is DEST), with any that follow options."""
    p.add_argument("path_sources", nargs="+", metavar=name, help=help)
    p.add_argument("path_dest", metavar="DEST", help=dest_help)


def _add_explain(sub: Any) -> None:
    from streamshard.cli_explain import add_explain

    add_explain(sub)


def _add_quarantine(sub: Any) -> None:
    from streamshard.cli_quarantine import add_quarantine

    add_quarantine(sub)


def _add_benchmark(sub: Any) -> None:
    from streamshard.cli_benchmark import add_benchmark

    add_benchmark(sub)


_SUBCOMMANDS: list[Callable[[Any], None]] = [_add_convert, _add_inspect, _add_verify, _add_merge,
                                             _add_plan, _add_demo, _add_explain, _add_quarantine,
                                             _add_launch, _add_benchmark]


def build_parser() -> argparse.ArgumentParser:
    from streamshard import __version__

    parser = argparse.ArgumentParser(
        prog="streamshard", description="Sharded, checksummed datasets for PyTorch.")
    parser.add_argument("--version", action="version", version=f"streamshard {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    for subparser in sub.choices.values():  # --debug also after the subcommand
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                               help="show tracebacks on errors")
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (tests capture it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(debug: bool = False) -> None:
    """Show the ``streamshard`` loggers' records on stderr, one line each (INFO and up; DEBUG
    with ``--debug``). Idempotent: the demo and tests call ``main`` many times."""
    logger = logging.getLogger("streamshard")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("streamshard: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)


def one_line(exc: BaseException) -> str:
    """``exc`` as one redacted line: ``<what>: <file>`` for OS errors, else its class and text."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror}{where}"
    elif isinstance(exc, RecursionError):
        text = "input nested too deeply to process"
    elif isinstance(exc, MemoryError):
        text = "out of memory"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return redact(" ".join(text.split()))[:500]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:  # torchrun's parser, not ours
        from streamshard.recovery.launch import main as launch_main

        return launch_main(argv[1:], exit_process=True)
    parser = build_parser()
    # SRC... DEST may come before and after options (`convert a b --format x DEST`): argparse
    # leaves the later positionals over, and they are appended in order.
    args, extra = parser.parse_known_args(argv)  # exits with 2 on usage errors
    has_paths = hasattr(args, "path_sources")
    if extra and (not has_paths or any(x.startswith("-") for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if has_paths:
        args.paths = [*args.path_sources, args.path_dest, *extra]
    configure_logging(args.debug)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("streamshard: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as exc:
        if exc.name != "torch" or args.debug:
            raise
        print(f"streamshard: error: {args.command} needs PyTorch: pip install 'streamshard[torch]' "
              f"(convert, inspect, verify and merge do not)", file=sys.stderr)
        return EXIT_FAIL
    except StreamshardError as exc:
        if args.debug:
            raise
        print(f"streamshard: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAIL
    except (OSError, RecursionError, MemoryError, OverflowError) as exc:
        # Not a streamshard error but the user's environment or input (a path that is a
        # directory, no permission, a number too large, input nested too deeply): one line.
        if args.debug:
            raise
        print(f"streamshard: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
