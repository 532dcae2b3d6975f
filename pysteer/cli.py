"""``pysteer`` command line. Each subcommand lives in its own module exposing
``HELP: str``, ``add_arguments(parser)`` and ``run(args) -> int``; modules load only when used."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

SUBCOMMANDS: dict[str, str] = {
    "info": "pysteer.cli_info",
    "demo": "pysteer.demo",
    "generate": "pysteer.cli_generate",
    "trace": "pysteer.tracing.cli",
    "locate": "pysteer.recipes.cli_locate",
    "edit": "pysteer.recipes.cli_edit",
    "scale": "pysteer.recipes.cli_scale",
    "jola": "pysteer.recipes.cli_jola",
    "causal-trace": "pysteer.recipes.cli_causal_trace",
    "absc": "pysteer.recipes.cli_absc",
    "lf-steer": "pysteer.recipes.cli_lf_steer",
    "edit-seq": "pysteer.recipes.cli_edit_seq",
    "uncertainty": "pysteer.uncertainty.cli",
    "abstain": "pysteer.uncertainty.cli_abstain",
}


def _load(name: str):
    try:
        return importlib.import_module(SUBCOMMANDS[name])
    except ModuleNotFoundError as err:
        if err.name and SUBCOMMANDS[name].startswith(err.name):
            return None
        raise


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pysteer",
        description="Fast steering and tracing for Hugging Face LMs",
        epilog="Errors print one line; add --debug anywhere (or set PYSTEER_DEBUG=1) for the traceback.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        if only is not None and name != only:
            # other subcommands are listed without importing their modules
            sub.add_parser(name)
            continue
        module = _load(name)
        if module is None:
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _message(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return str(text) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. An error prints one line, ``pysteer COMMAND: error: ...``, and exits 1;
    ``--debug`` (anywhere on the line) or ``PYSTEER_DEBUG=1`` shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PYSTEER_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if getattr(args, "_module", None) is None:
        parser.print_help()
        return 0 if command is None else 2
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"pysteer {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        print(f"pysteer {command}: error: {_message(err)}  (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
