"""``python -m sedit.eval TOOL [ARGS...]``: dispatch to ``sedit.eval.TOOL``."""

import importlib
import sys

TOOLS = ("generate", "fid", "clip_score", "report", "weights", "classifier")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TOOLS:
        sys.exit(f"usage: python -m sedit.eval {{{','.join(TOOLS)}}} [--help]")
    tool = sys.argv[1]
    importlib.import_module(f"sedit.eval.{tool}").main(sys.argv[2:])


if __name__ == "__main__":
    main()
