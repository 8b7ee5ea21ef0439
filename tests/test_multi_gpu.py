"""Data-parallel training (configs/multi_gpu_train.json over train.json) and work sharding across ranks.

The torchrun test runs two CPU processes with the ``gloo`` backend for one short epoch of both stages.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import BUNDLE_ROOT, bundle_env
from scripts.training.checkpoints import ResumeOnly
from scripts.training.distributed import RankLogger, get_rank, get_world_size, rank_zero_handlers, shard
from scripts.evaluation.handlers import NucleusDetectionMetric


# ----------------------------------------------------------------------------------------------- shard
def test_shard_splits_items_disjointly_and_completely() -> None:
    items = [f"slide_{i}" for i in range(10)]
    shares = [shard(items, rank, 3) for rank in range(3)]
    assert shares[0] == ["slide_0", "slide_3", "slide_6", "slide_9"]
    assert sorted(sum(shares, [])) == sorted(items)
    assert [len(s) for s in shares] == [4, 3, 3]
    assert shard(items) == items  # not distributed: rank 0 of 1
    assert shard([], 1, 2) == [] and shard(range(3), 3, 4) == []  # more ranks than items: empty shares
    assert shard((x for x in "abc"), 1, 2) == ["b"]  # any iterable


@pytest.mark.parametrize("rank, world", [(-1, 2), (2, 2), (0, 0)])
def test_shard_rejects_bad_rank_or_world(rank: int, world: int) -> None:
    with pytest.raises(ValueError, match="rank|world_size"):
        shard([1, 2, 3], rank, world)


def test_single_process_handlers_are_kept() -> None:
    handlers = [object(), object()]
    out = rank_zero_handlers(handlers, "prompter")
    assert out[:2] == handlers and isinstance(out[2], RankLogger)
    assert get_rank() == 0 and get_world_size() == 1


def test_other_ranks_keep_what_does_not_write(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """On a rank > 0: the checkpointer becomes its resume-only half, rank-0-only handlers and MONAI's writers go."""
    from monai.handlers import StatsHandler

    from scripts.training import distributed
    from scripts.training.checkpoints import TrainingCheckpointer
    from scripts.training.tracking_hook import StageTrackingHook

    monkeypatch.setattr(distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    checkpointer = TrainingCheckpointer(str(tmp_path), {})
    hook = StageTrackingHook([], "prompter")
    other = object()
    with caplog.at_level("INFO", logger="scripts.training.distributed"):
        out = rank_zero_handlers([checkpointer, StatsHandler(), hook, other], "prompter")
    assert isinstance(out[0], ResumeOnly) and out[0].checkpointer is checkpointer
    assert out[1] is other and isinstance(out[2], RankLogger) and len(out) == 3
    assert ("handlers left to rank 0: TrainingCheckpointer (resume only), StatsHandler, StageTrackingHook"
            in caplog.text)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank: int, world: int, port: int, points: list, out_dir: str) -> None:
    """One rank: shard the images with the process group's defaults, score its share, aggregate (gathered)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metric = NucleusDetectionMetric({1: "a", 2: "b"}, det_radius=3.0)
        mine = shard(points)  # rank and world size from torch.distributed
        for true_xy, pred_xy, true_c, pred_c in mine:
            metric.update(true_xy, pred_xy, true_c, pred_c)
        result = metric.aggregate()
        torch.save({"n_local": len(mine), "result": result}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_metrics_equal_single_process(tmp_path: Path) -> None:
    """Validation sharded over 2 gloo ranks gathers to the single-process figures (MONAI Cumulative)."""
    rng = np.random.default_rng(0)
    points = []
    for n_img in range(5):  # uneven: ranks get 3 and 2 images
        true_xy = rng.uniform(0, 60, (6 + n_img, 2))
        pred_xy = np.concatenate([true_xy[: 4 + n_img // 2] + rng.normal(0, 1, (4 + n_img // 2, 2)),
                                  rng.uniform(0, 60, (2, 2))])
        points.append((true_xy, pred_xy, rng.integers(1, 3, len(true_xy)), rng.integers(1, 3, len(pred_xy))))
    single = NucleusDetectionMetric({1: "a", 2: "b"}, det_radius=3.0)
    for args in points:
        single.update(*args)
    expected = single.aggregate()
    mp.start_processes(_gather_worker, args=(2, _free_port(), points, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["n_local"] for r in results] == [3, 2]
    for r in results:
        assert r["result"] == expected  # pooled integer counts: exactly the single-process figures
        assert r["result"]["n_images"] == 5


# ----------------------------------------------------------------------------------------------- torchrun
@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scripts.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("ddp") / "data", 4, size=(96, 96), n_nuclei=(6, 10),
                                   num_classes=2, seed=0)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_both_stages(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "monai.bundle", "run", "training",
           "--config_file", "['configs/train.json','configs/multi_gpu_train.json']",
           "--tracking", "mlflow",
           "--dataset_dir", str(dataset), "--output_dir", str(out), "--val_fraction", "0.25",
           "--max_epochs", "1", "--epoch_length", "2", "--patch_size", "64",
           "--prompter#hparams#batch_size", "1", "--segmentor#hparams#batch_size", "1", "--segmentor#hparams#num_prompts_per_image", "4"]
    env = bundle_env(threads=1)
    proc = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)
    log = proc.stdout
    assert proc.returncode == 0, log[-6000:]

    # both ranks initialised gloo and trained each stage on their own share (2 iterations of 1 image each)
    for rank in (0, 1):
        assert f"rank {rank}/2: process group ready (gloo" in log
        for stage in ("prompter", "segmentor"):
            assert re.search(rf"rank {rank}/2: {stage} epoch 1: 2 iterations, 2 samples", log), (rank, stage)
    assert re.search(r"rank 1/2: segmentor handlers left to rank 0: .*TrainingCheckpointer \(resume only\)", log)
    assert "rank 0/2: segmentor handlers left to rank 0" not in log

    # exactly one checkpoint set per stage, written by rank 0, with the unwrapped network's keys
    for stage in ("prompter", "segmentor"):
        assert sorted(p.name for p in (out / stage).iterdir()) == ["best.pt", "last.pt"]
        state = torch.load(out / stage / "last.pt", map_location="cpu", weights_only=True)
        assert state["trainer"]["epoch"] == 1
        assert not any(k.startswith("module.") for k in state["network"])

    # MLflow on rank 0 only: one run per stage, world_size logged
    import mlflow
    from monai.utils import path_to_sqlite_uri

    client = mlflow.MlflowClient(path_to_sqlite_uri(out / "mlflow.db"))
    experiment = client.get_experiment_by_name("promptnucseg")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["stage"] for r in runs) == ["prompter", "segmentor"]
    assert all(r.data.params["world_size"] == "2" and r.info.status == "FINISHED" for r in runs)


def test_resume_only_never_saves() -> None:
    from ignite.engine import Engine, Events

    class Checkpointer:
        resume = True
        loaded = 0

        def _load_last(self, engine: Engine) -> None:
            Checkpointer.loaded += 1

    engine = Engine(lambda e, b: None)
    ResumeOnly(Checkpointer()).attach(engine)
    engine.run([0], max_epochs=1)
    assert Checkpointer.loaded == 1
    assert not engine._event_handlers[Events.EPOCH_COMPLETED]
