"""``streamshard quarantine list|add|remove|export STATE.json``: the quarantine ledger of a state.

    streamshard quarantine list STATE.json [DATASET ...] [--json]
    streamshard quarantine add STATE.json 0:1234 0:99@5000      # STREAM:ID[@FROM_STEP]
    streamshard quarantine remove STATE.json 0:1234
    streamshard quarantine export STATE.json DATASET ... [-o quarantined.jsonl]

``add`` without ``@FROM_STEP`` quarantines from the state's next step (history is kept). ``add`` and
``remove`` rewrite a plain loader state file atomically; a checkpoint's meta.json is read-only
here (its manifest checksums it). ``export`` writes one JSON line per quarantined sample with its
source (shard file, offset, id/path columns) for the data team.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from streamshard.errors import ConfigError

_ENTRY = re.compile(r"^(?P<stream>\d+):(?P<id>\d+)(?:@(?P<from>\d+))?$")


def add_quarantine(sub: Any) -> None:
    p = sub.add_parser("quarantine", help="list, add, remove or export quarantined sample ids "
                                          "of a loader state", description=__doc__.split("\n\n")[0])
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    ls = verbs.add_parser("list", help="the ledger, with sources when DATASETs are given")
    ls.add_argument("state")
    ls.add_argument("datasets", nargs="*", metavar="DATASET")
    ls.add_argument("--json", action="store_true")
    for verb, text in (("add", "quarantine STREAM:ID[@FROM_STEP] entries"),
                       ("remove", "lift the quarantine of STREAM:ID entries")):
        v = verbs.add_parser(verb, help=text)
        v.add_argument("state")
        v.add_argument("entries", nargs="+", metavar="STREAM:ID")
    ex = verbs.add_parser("export", help="quarantined ids with their sources, one JSON line each")
    ex.add_argument("state")
    ex.add_argument("datasets", nargs="+", metavar="DATASET")
    ex.add_argument("-o", "--output", help="file to write (default stdout)")
    for v in verbs.choices.values():
        v.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    p.set_defaults(func=cmd_quarantine)


def parse_entry(text: str, default_from: int) -> tuple[int, int, int]:
    m = _ENTRY.match(text)
    if m is None:
        raise ConfigError(f"quarantine entry must be STREAM:ID[@FROM_STEP], got {text!r}")
    return int(m["stream"]), int(m["id"]), int(m["from"]) if m["from"] else default_from


def cmd_quarantine(args: argparse.Namespace) -> int:
    from streamshard.cli_explain import read_state
    from streamshard.sampler import Ledgers

    state, container = read_state(args.state)
    ledgers = Ledgers.from_state(state)
    if args.verb in ("add", "remove"):
        if container is not None:
            raise ConfigError(f"{args.state} is a checkpoint's meta.json (checksummed by its manifest): "
                              "edit a loader state file, or let recovery journal the quarantine")
        step = int(state.get("step", 0))
        entries = [parse_entry(e, step) for e in args.entries]
        if args.verb == "add":
            ledgers = ledgers.with_quarantine(entries)
        else:
            ledgers = ledgers.without_quarantine([e[:2] for e in entries])
        _write_state(args.state, {**state, **ledgers.to_state()})
        print(f"{args.state}: {len(ledgers.quarantine)} quarantined sample(s)")
        return 0
    datasets = _open(getattr(args, "datasets", []))
    rows = [_row(entry, datasets) for entry in ledgers.quarantine]
    if args.verb == "export":
        text = "".join(json.dumps(r, default=str) + "\n" for r in rows)
        if args.output:
            from streamshard.atomic import atomic_write

            atomic_write(args.output, text.encode())
        else:
            sys.stdout.write(text)
        return 0
    if args.json:
        print(json.dumps(rows, default=str))
        return 0
    print(f"{len(rows)} quarantined sample(s) in {args.state}")
    for r in rows:
        where = f" {r['shard_file']}#{r['offset']}" if "shard_file" in r else ""
        keys = " " + " ".join(f"{k}={v}" for k, v in r["keys"].items()) if r.get("keys") else ""
        print(f"  stream {r['stream']} sample {r['sample_id']} from step {r['from_step']}{where}{keys}")
    return 0


def _open(paths: list[str]) -> list:
    from streamshard.reader import open_dataset

    return [open_dataset(p) for p in paths]


def _row(entry: tuple[int, int, int], datasets: list) -> dict:
    from streamshard.explain import source_of

    stream, sample, from_step = entry
    row = {"stream": stream, "sample_id": sample, "from_step": from_step}
    if datasets:
        if stream >= len(datasets):
            raise ConfigError(f"quarantined stream {stream} but only {len(datasets)} DATASET(s) given")
        row.update(source_of(datasets, stream, sample))
        row["dataset"] = datasets[stream].fingerprint
    return row


def _write_state(path: str, state: dict) -> None:
    from streamshard.atomic import atomic_write

    atomic_write(path, (json.dumps(state, indent=1) + "\n").encode())
