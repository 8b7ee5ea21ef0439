"""The parts of two benchmark scripts that decide what they report: the candidate-versus-shipped verdict
(``benchmarks/compare_models.py``) and the reading of a trainer's log (``benchmarks/bench_training_precision.py``)."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from bench_training_precision import iteration_seconds, iteration_stamps, last_validation  # noqa: E402
from compare_models import better_everywhere  # noqa: E402

BASELINE = {"consep_train": {"pq": 0.4023, "mpq": 0.3022}, "monuseg_train": {"pq": 0.5661, "mpq": None}}


def test_a_candidate_must_be_above_on_every_source_and_on_mpq():
    assert better_everywhere({"consep_train": {"pq": 0.41, "mpq": 0.31}, "monuseg_train": {"pq": 0.57}}, BASELINE) == []
    worse = better_everywhere({"consep_train": {"pq": 0.41, "mpq": 0.30}, "monuseg_train": {"pq": 0.5661}}, BASELINE)
    assert worse == ["consep_train: mpq 0.3000 vs 0.3022", "monuseg_train: pq 0.5661 vs 0.5661"]  # a tie is not above
    assert better_everywhere({"consep_train": {"pq": 0.5, "mpq": None}, "monuseg_train": {"pq": 0.6}}, BASELINE) == [
        "consep_train: mpq – vs 0.3022"]  # a candidate without classes loses the class figure


LOG = """\
2026-12-07 21:53:08,000 - INFO - Epoch: 15/120, Iter: 1/89 -- prompter_loss: 0.2002
2026-12-07 21:53:09,500 - INFO - Epoch: 15/120, Iter: 2/89 -- prompter_loss: 0.3300
2026-12-07 21:53:10,750 - INFO - Epoch: 15/120, Iter: 3/89 -- prompter_loss: 0.1815
2026-12-07 21:53:20,000 - INFO - Epoch[16] Metrics -- f1_det: 0.7400 f1_per_class/Other: 0.2000 precision_det: nan
2026-12-07 21:53:21,000 - INFO - Epoch[16] Metrics -- loss: 0.2271 loss_aux: 0.0500
2026-12-07 21:53:22,000 - INFO - Epoch: 1/80, Iter: 1/7 -- segmentor_loss: 1.2
2026-12-07 21:53:24,000 - INFO - Epoch: 1/80, Iter: 2/7 -- segmentor_loss: 1.1
2026-12-07 21:53:30,000 - INFO - Epoch[1] Metrics -- aji: 0.2 dq: 0.3 pq: 0.25 sq: 0.7
"""


def test_the_training_log_is_read_per_stage():
    assert iteration_seconds(LOG, "prompter", skip=0) == [1.5, 1.25]
    assert iteration_seconds(LOG, "prompter", skip=1) == [1.25]
    assert iteration_seconds(LOG, "segmentor", skip=0) == [2.0] and len(iteration_stamps(LOG, "segmentor")) == 2
    prompter = last_validation(LOG, "f1_det")
    assert prompter["epoch"] == 16 and prompter["f1_det"] == 0.74 and prompter["f1_per_class/Other"] == 0.2
    assert last_validation(LOG, "pq") == {"epoch": 1, "aji": 0.2, "dq": 0.3, "pq": 0.25, "sq": 0.7}
    with pytest.raises(SystemExit, match="no validation with mpq"):
        last_validation(LOG, "mpq")
