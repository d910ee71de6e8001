"""Both ``bench/trace/`` (the server) and ``bench/steps/`` (the load generator) in one
run: Python's ``site`` imports a single ``sitecustomize``, so this one loads the two by
path. For ``bench/trace/auth_wire.py``:

    CLIENTID_TRACE=/tmp/trace CLIENTID_STEPS=/tmp/steps PYTHONPATH=$PWD/bench/wire \\
        python bench/compare.py --peers ours --workloads a --rate 350 --duration 15
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent

for folder in ("trace", "steps"):
    spec = importlib.util.spec_from_file_location(
        f"clientid_bench_{folder}", BENCH / folder / "sitecustomize.py"
    )
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
