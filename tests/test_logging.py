"""Library code reports through the ``streamshard`` logger hierarchy, never print; the CLI
configures a stderr handler; collate.py uses torch's public API only."""

from __future__ import annotations

import ast
import logging

from streamshard.cli import configure_logging
from tests.layout import modules

# Programs print their output on purpose: the command line (streamshard.cli and its cli_*
# subcommand modules), the demo, and the launcher and per-rank keeper of `streamshard launch`.
PROGRAMS = {"streamshard.demo", "streamshard.recovery.keeper", "streamshard.recovery.launch"}


def is_program(name: str) -> bool:
    return name in PROGRAMS or name.split(".")[-1].startswith("cli")


def _source(name: str) -> ast.AST:
    path = modules()[name]
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def test_no_print_and_no_print_default_in_library_code():
    offenders = []
    for name in sorted(modules()):
        if is_program(name):
            continue
        for node in ast.walk(_source(name)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{name}:{node.lineno} print()")
            if isinstance(node, ast.arguments):
                for default in [*node.defaults, *node.kw_defaults]:
                    if isinstance(default, ast.Name) and default.id == "print":
                        offenders.append(f"{name}:{default.lineno} print as a default")
    assert offenders == []


def test_collate_uses_public_torch_api_only():
    private = [ast.unparse(node) for node in ast.walk(_source("streamshard.collate"))
               if isinstance(node, (ast.Import, ast.ImportFrom))
               and "._" in ((node.module or "") if isinstance(node, ast.ImportFrom)
                            else ",".join(a.name for a in node.names))]
    assert private == []


def test_recovery_reports_through_its_logger(caplog):
    from streamshard.recovery.health import available_probes

    with caplog.at_level(logging.INFO, logger="streamshard"):
        probes = available_probes(None)  # no GPU here: the NVML probe says why it is off
    if not probes:
        assert any(r.name == "streamshard.recovery.health" and "NVML probe disabled" in r.getMessage()
                   for r in caplog.records)


def test_cli_handler_is_installed_once_and_follows_stderr(capsys):
    configure_logging()
    configure_logging()  # the demo runs the command line many times in one process
    logging.getLogger("streamshard.remote.source").warning("read s3://b/x failed; retrying")
    logging.getLogger("streamshard.reader").debug("not shown below --debug")
    err = capsys.readouterr().err
    assert err.count("streamshard: WARNING: read s3://b/x failed; retrying") == 1
    assert "not shown" not in err
    configure_logging(debug=True)
    logging.getLogger("streamshard.reader").debug("shown with --debug")
    assert "streamshard: DEBUG: shown with --debug" in capsys.readouterr().err
    configure_logging()  # leave INFO for the tests that follow


def test_library_import_adds_only_a_null_handler():
    import streamshard  # noqa: F401

    handlers = logging.getLogger("streamshard").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)
