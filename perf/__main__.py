"""``python -m perf NAME [--json] [options]``: run one benchmark, print its table."""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

BENCHMARKS = {"transport": "perf.transport", "ttff": "perf.ttff", "render": "perf.render",
              "restart": "perf.restart", "vad": "perf.vad",
              "lipsync": "perf.lipsync"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m perf {{{','.join(BENCHMARKS)}}} [--json] [options]", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
