"""`builder` command line: one subcommand per module, each module adds its arguments and runs."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module with add_arguments(parser) and run(args) -> exit code
COMMANDS = {
    "list": ("builder.variants", "list the variants, one line each"),
    "plan": ("builder.plan", "estimate a variant's artifact bytes before training: does it fit 16,000,000?"),
    "assemble": ("builder.assemble", "assemble a variant into a submission folder"),
    "run": ("builder.run", "run a submission for one or more seeds, one log per seed"),
    "collect": ("builder.collect", "read a submission's logs and fill in submission.json"),
    "data": ("builder.data.cli", "make or fetch datasets: sample, text, fineweb"),
}


class UserError(Exception):
    """Bad input: the message names the file and the fix; the command exits 2 with that one line."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="builder", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (modname, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name != modname:
                raise
            continue
        modules[name] = mod
        mod.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args))
    except UserError as exc:
        print(f"builder {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("builder: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run through the package module, so that UserError is the class the subcommands raise.
    from builder.cli import main as _package_main

    sys.exit(_package_main())
