"""Run the bundle's own commands from the benchmarks (``python -m monai.bundle run <id> ...`` in ``bundle/``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BUNDLE = Path(__file__).resolve().parent.parent / "bundle"


def bundle(*args: str) -> None:
    """``python -m monai.bundle run *args`` from ``bundle/``; exits with the command's last output on failure."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run(cmd, cwd=BUNDLE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}")
