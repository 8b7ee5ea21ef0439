"""The shipped default model and ``make demo``: one file under 25 MB with both parts and the class table; the demo
writes every output for every sample tile."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BUNDLE_ROOT
from scripts.pipeline.model_file import load_model
from scripts.data.records import load_class_table

SHIPPED = BUNDLE_ROOT / "models" / "model.pt"
SAMPLES = sorted((BUNDLE_ROOT / "sample_data" / "images").glob("*.png"))


def test_shipped_model_is_one_small_file_with_both_parts_and_the_class_table():
    assert SHIPPED.is_file(), f"no shipped model at {SHIPPED}"
    assert SHIPPED.stat().st_size < 25 * 2**20
    network = load_model(SHIPPED)
    assert network.prompter is not None and network.segmentor is not None
    assert network.class_table == load_class_table()  # metadata.json documents the shipped model's own table


@pytest.mark.slow
def test_make_demo_writes_every_output(tmp_path: Path):
    assert len(SAMPLES) >= 4
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "scripts.demo", "--output_dir", str(tmp_path)], cwd=BUNDLE_ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no model at" not in proc.stderr  # the shipped model was used, not a smoke training
    for image in SAMPLES:
        for suffix in ("_inst.tif", "_type.tif", ".geojson", ".csv", "_overlay.png"):
            assert (tmp_path / f"{image.stem}{suffix}").is_file(), f"{image.stem}{suffix} missing"
