"""Shared bits of the benchmarks: percentiles, tables, the JSON line."""
from __future__ import annotations

import json
import sys
from typing import Any, Sequence

import numpy as np


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if len(values) else float("nan")


def table(rows: list[Sequence[Any]], out=sys.stdout) -> None:
    text = [[c if isinstance(c, str) else f"{c:,.1f}" if isinstance(c, float) else str(c) for c in r]
            for r in rows]
    widths = [max(len(r[i]) for r in text) for i in range(len(text[0]))]
    for j, r in enumerate(text):
        print("  ".join(c.rjust(w) if j and i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))),
              file=out)
        if j == 0:
            print("  ".join("-" * w for w in widths), file=out)
    out.flush()


def emit_json(result: dict) -> None:
    print(json.dumps(result, sort_keys=True))


def machine() -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpu(s), python {platform.python_version()}"
