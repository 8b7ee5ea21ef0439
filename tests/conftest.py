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
