"""What an agent process and `fedkube run` import before their first round: the modules
that cost seconds of CPU each (Opacus pulls in torch.distributed, SymPy and SciPy) are
imported only by the jobs that use them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

HEAVY = ("opacus", "scipy", "sympy", "sklearn", "matplotlib", "mlflow")


def _imported_after(code: str) -> list[str]:
    probe = (f"{code}\nimport json, sys\n"
             f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-P", "-c", probe], check=True, capture_output=True,
                         text=True, env={**os.environ, "PYTHONSAFEPATH": "1"}, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_agent_and_run_paths_import_no_heavy_optional_modules() -> None:
    # One interpreter per path: each fresh one costs seconds on a loaded machine.
    assert _imported_after("import fedkube.runtime.cli, fedkube.runtime.agent.client") == []
    # `fedkube run` hosts the coordinator, whose fold is compiled by numba; numba checks
    # SciPy's version when SciPy is installed, so SciPy comes with it there, and only there.
    run_path = _imported_after("import fedkube.runtime.cli, fedkube.runtime.local")
    assert [m for m in run_path if m != "scipy"] == []
