"""Per-step latency from ``bench/steps/sitecustomize.py``'s files: one line a step, the
steps that cost the most time in all first.

    python bench/steps/report.py /tmp/steps
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(folder: str) -> None:
    steps: dict[str, list[float]] = {}
    for path in Path(folder).glob("steps.*.json"):
        for step, values in json.loads(path.read_text()).items():
            steps.setdefault(step, []).extend(values)
    print(f"{'step':16} {'n':>7} {'p50 ms':>8} {'p90 ms':>8} {'mean ms':>8}")
    for step, values in sorted(steps.items(), key=lambda item: -sum(item[1])):
        values.sort()
        p50, p90 = values[len(values) // 2], values[int(len(values) * 0.9)]
        mean = statistics.fmean(values)
        print(f"{step:16} {len(values):7d} {p50 * 1e3:8.2f} {p90 * 1e3:8.2f} {mean * 1e3:8.2f}")


if __name__ == "__main__":
    main(sys.argv[1])
