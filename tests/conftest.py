"""Shared pytest set-up: the bundle's ``scripts`` package on the path, deterministic CPU threads, no telemetry."""

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLE_ROOT = REPO_ROOT / "bundle"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MONAI_SKIP_SUBPROCESS_CHECK", "1")
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("PNS_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real data folder; the tests that use it fail loudly when it is missing."""
    if not SHARED_DATA.is_dir():
        raise FileNotFoundError(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


BUNDLE_PYTHON = sys.executable


def bundle_env(threads: int = 2) -> dict:
    """Environment of a bundle command run by a test: few threads, no telemetry, the bundle importable."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        MLFLOW_DISABLE_TELEMETRY="true",
        PYTHONPATH=str(BUNDLE_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def run_bundle(run_id: str, config_file: str, *args: str, timeout: float = 900, check: bool = True):
    """Run ``python -m monai.bundle run <run_id> --config_file <config_file> <args>`` from ``bundle/``.

    Returns the CompletedProcess (stdout and stderr merged into ``stdout``); with ``check`` a non-zero exit
    fails the test showing the end of the log.
    """
    import subprocess

    cmd = [BUNDLE_PYTHON, "-m", "monai.bundle", "run", run_id, "--config_file", config_file, *args]
    proc = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=bundle_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc
