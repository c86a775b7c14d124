"""`make bench`: every performance table of issue 5, each script in its own process (fresh dynamo and
allocator state). Tables go to stdout, JSON to benchmarks/results/. Extra arguments go to overhead.py,
e.g. `python benchmarks/run_all.py --reps 30`."""
from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    runs = [
        ["overhead.py", *sys.argv[1:]],
        ["update_cost.py"],
        ["pass_time.py"],
        ["kernel_count.py"],
    ]
    failed = []
    for script, *args in runs:
        print(f"\n== python benchmarks/{script} {' '.join(args)}".rstrip(), flush=True)
        code = subprocess.call([sys.executable, os.path.join(HERE, script), *args])
        if code:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
