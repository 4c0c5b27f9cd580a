"""Imported first by each benchmark script (`import rootpath`): the project root on sys.path, not bench/.

Run as a script (`python bench/api_bench.py`, as the Makefile does), Python puts bench/ first
on sys.path. There settings.py and urls.py would shadow top-level modules, and the `bench`
package itself would not be importable. This module is found there as plain `rootpath` and
swaps bench/ for the project root, so everything after it imports as `bench.*`, `builds.*`, ...
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent

sys.path[:] = [str(BENCH_DIR.parent)] + [p for p in sys.path if p and Path(p).resolve() != BENCH_DIR]
