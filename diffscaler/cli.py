"""The `diffscaler` command line. Each subpackage registers its own subcommands.

diffscaler model-info --model DiT-XL/2 --input-size 32 --in-channels 4 --json
diffscaler init-backbone --model DiT-T/4 --input-size 32 --in-channels 3 --num-classes 10 --out FILE
diffscaler sample --backbone FILE [--adapters A.safetensors ...] --task a,b --num 16 --out DIR
diffscaler shards make --source emoji --out shards/emoji
diffscaler shards check shards/emoji
"""

from __future__ import annotations

import argparse
import importlib
import sys

from diffscaler.config import ConfigError
from diffscaler.errors import no_space_message
from diffscaler.runlock import RunFolderError

# Modules with a `register(subparsers)` function; each subcommand sets `func` on its parser.
COMMAND_MODULES = ("diffscaler.cli_model", "diffscaler.data.cli", "diffscaler.serving.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffscaler", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError, RunFolderError) as err:
        print(f"diffscaler {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, permissions: the file and the reason, not a traceback
        print(f"diffscaler {args.command}: error: {no_space_message(err) or err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
