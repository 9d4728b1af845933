"""`validator` command line: one subcommand per module, each module adds its arguments and runs."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module with add_arguments(parser) and run(args) -> exit code
COMMANDS = {
    "check": ("validator.commands.check", "check a submission folder statically (no GPU)"),
    "pr": ("validator.commands.pr", "check the records folders a pull request adds, in a git checkout"),
    "rerun": ("validator.rerun", "re-execute a submission in the sandbox and compare with its claims"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="validator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    args_in = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in args_in if a in COMMANDS), None)  # import only the command that runs (start-up time)
    for name, (modname, help_text) in COMMANDS.items():
        if chosen is not None and name != chosen:
            sub.add_parser(name, help=help_text, description=help_text)
            continue
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
    except KeyboardInterrupt:
        print("validator: interrupted", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
