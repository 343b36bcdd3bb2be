#!/usr/bin/env python
"""Run the benchmarks: the same as `mlcapsule bench` (pass its options, e.g. --quick or --suite fixed).

Run from the repository root; results go to benchmarks/results/*.json and BENCHMARKS.md.
The code lives in src/mlcapsule/bench.
"""

import sys

from mlcapsule.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
