"""MLflow tracking through MONAI's ``--tracking`` switch: training stages, evaluation, comparison, failures.

Every bundle command runs in a subprocess from ``bundle/`` on a tiny synthetic dataset; the local store is
SQLite under the output folder. A test that starts an ``mlflow server`` binds it to 127.0.0.1 and stops it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import mlflow  # noqa: E402
from monai.utils import path_to_sqlite_uri  # noqa: E402

from conftest import BUNDLE_ROOT, bundle_env, run_bundle  # noqa: E402
from scripts.training.tracking import (  # noqa: E402
    artifact_files,
    default_tracking_uri,
    numeric_metrics,
    tracking_problem,
)
from scripts.training.tracking_overlays import points_to_discs, sample_overlay  # noqa: E402
from scripts.training.tracking_run import StageRun  # noqa: E402  (its logger must exist before caplog starts)

TINY = ["--max_epochs", "2", "--epoch_length", "1", "--patch_size", "64", "--val_fraction", "0.25",
        "--segmentor#hparams#num_prompts_per_image", "4", "--prompter#hparams#batch_size", "2", "--segmentor#hparams#batch_size", "2"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is


# ----------------------------------------------------------------------------------------------- helpers (fast)
def test_numeric_metrics_flatten_and_drop_non_numbers() -> None:
    import torch

    values = {"pq": 0.5, "sq": float("nan"), "f1_per_class": {"Epithelial": None, "Spindle-shaped": 0.25},
              "name": "x", "flag": True, "n": np.int64(3), "t": torch.tensor(1.5), "odd key!": 1}
    out = numeric_metrics(values)
    assert out["pq"] == 0.5 and np.isnan(out["sq"]) and out["n"] == 3.0 and out["t"] == 1.5
    assert out["f1_per_class/Spindle-shaped"] == 0.25 and "f1_per_class/Epithelial" not in out
    assert "name" not in out and "flag" not in out and out["odd key_"] == 1.0


def test_points_to_discs_ids_and_clipping() -> None:
    inst = points_to_discs(np.array([[5.0, 10.0], [0.0, 0.0]]), (20, 30), radius=2)  # (x, y)
    assert inst[10, 5] == 1 and inst[12, 5] == 1 and inst[13, 5] == 0  # disc around row 10, col 5
    assert inst[0, 0] == 2 and (inst == 2).sum() < (inst == 1).sum()  # clipped at the corner
    assert points_to_discs(np.zeros((0, 2)), (4, 4)).max() == 0


def test_sample_overlay_is_drawn_in_memory_truth_left_prediction_right() -> None:
    import torch

    table = {1: {"name": "a", "color": [255, 0, 0]}, 2: {"name": "b", "color": [0, 0, 255]}}
    image = torch.full((3, 20, 30), 100.0)  # (3, H, W) in [0, 255], as the evaluator's batch holds it
    output = {"points": torch.tensor([[5.0, 10.0]]), "classes": torch.tensor([1]),
              "pred_points": torch.tensor([[20.0, 10.0]]), "pred_classes": torch.tensor([2])}  # (x, y)
    overlay = sample_overlay(image, output, table)
    assert overlay.dtype == np.uint8 and overlay.shape == (20, 2 * 30 + 4, 3)
    assert overlay[10, 5 + 3].tolist() == [255, 0, 0]  # truth: the right edge of the disc around (5, 10)
    assert overlay[10, 34 + 20 + 3].tolist() == [0, 0, 255]  # prediction, in the right panel
    assert (overlay[:, 30:34] == 255).all() and overlay[0, 0].tolist() == [100, 100, 100]
    output["pred_classes"] = torch.tensor([7])  # a class outside the table: every nucleus unclassified
    assert sample_overlay(image, output, table)[10, 34 + 20 + 3].tolist() == [255, 255, 0]
    assert sample_overlay(image, {"loss": 1.0}, table) is None


def test_log_evaluation_logs_the_scores_and_overlays_without_predicting_again(tmp_path: Path) -> None:
    from monai.handlers import MLFlowHandler

    from scripts.data.records import NucleusRecord
    from scripts.evaluation.scoring import evaluate
    from scripts.training.tracking_evaluation import log_evaluation

    inst = np.zeros((32, 32), np.int32)
    inst[4:12, 4:12], inst[18:28, 16:26] = 1, 2
    records = [NucleusRecord(name=f"im{i}", image=np.full((32, 32, 3), 90, np.uint8), inst_map=inst, type_map=inst)
               for i in range(3)]

    class Predictions:
        class_table = {1: {"name": "a", "color": [255, 0, 0]}, 2: {"name": "b", "color": [0, 0, 255]}}
        calls = 0

        def predict(self, record: NucleusRecord) -> tuple[np.ndarray, np.ndarray]:
            Predictions.calls += 1
            return record.inst_map, record.type_map

    predictions = Predictions()
    scores = evaluate(records, predictions, {1: "a", 2: "b"}, tmp_path / "eval", n_samples=2)
    assert scores["pq"] == pytest.approx(1.0) and [s.record.name for s in scores.samples] == ["im0", "im1"]
    uri = default_tracking_uri(tmp_path / "eval")
    handler = MLFlowHandler(tracking_uri=uri, experiment_name="e", run_name="r")
    run_ids = log_evaluation([handler, object()], scores, params={"pred_dir": "x"}, tags={"variant": "v"},
                             predictions=predictions)
    assert Predictions.calls == 3  # the scoring's predictions only
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_ids[0])
    assert run.data.tags["stage"] == "evaluation" and run.data.params["pred_dir"] == "x"
    assert run.data.metrics["pq"] == pytest.approx(1.0) and run.data.metrics["n_images"] == 3
    assert "metrics.json" in [a.path for a in client.list_artifacts(run_ids[0])]
    overlays = [a.path for a in client.list_artifacts(run_ids[0], "overlays")]
    assert overlays == ["overlays/im0_overlay.png", "overlays/im1_overlay.png"]
    from PIL import Image

    drawn = np.asarray(Image.open(client.download_artifacts(run_ids[0], overlays[1], str(tmp_path / "dl"))))
    assert drawn.shape == (32, 32, 3) and drawn[18, 20].tolist() == [0, 0, 255]  # the predictions' class table
    assert log_evaluation([], scores) == []  # no --tracking: nothing


def test_tracking_problem_names_a_closed_port_and_sqlite_folder_is_made(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    problem = tracking_problem(uri, timeout=2)
    assert problem and uri in problem
    sqlite_uri = default_tracking_uri(tmp_path / "new" / "out")
    assert sqlite_uri.startswith("sqlite:///") and sqlite_uri.endswith("/new/out/mlflow.db")
    assert (tmp_path / "new" / "out").is_dir() and tracking_problem(sqlite_uri) is None


def test_artifact_files_repair_monai_unevaluated_config_path(tmp_path: Path) -> None:
    config = tmp_path / "config_20240101_000000.json"
    config.write_text("{}")
    assert artifact_files([f"{tmp_path} + '/config_20240101_000000.json'", None, tmp_path / "missing"]) == [config]


def _stage_engine(save_dir: Path, uri: str) -> tuple:
    """A tiny trainer with a :class:`TrainingCheckpointer` and a :class:`StageRun` attached as in the bundle."""
    import torch
    from ignite.engine import Engine

    from scripts.training.checkpoints import TrainingCheckpointer

    net = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, batch: {"loss": torch.tensor(1.0)})
    checkpointer = TrainingCheckpointer(str(save_dir), {"network": net})
    checkpointer.attach(engine)
    run = StageRun("prompter", tracking_uri=uri, iteration_log=False, overlay=False, checkpointer=checkpointer)
    run.attach(engine)
    return engine, run


def test_resumed_training_marks_the_killed_run_and_logs_best_checkpoint(tmp_path: Path) -> None:
    """A killed training leaves its run RUNNING; when the training resumes (from last.pt), that run is marked
    KILLED (not a RUNNING run of another folder), and the new run logs the stage's best.pt."""
    import torch

    uri = default_tracking_uri(tmp_path)
    client = mlflow.MlflowClient(uri)
    engine, run = _stage_engine(tmp_path / "prompter", uri)
    engine.run([0, 1], max_epochs=1)
    (first,) = client.search_runs([client.get_experiment_by_name("promptnucseg").experiment_id])
    assert first.info.status == "FINISHED"
    assert first.data.tags["output_dir"] == str((tmp_path / "prompter").resolve())
    assert [a.path for a in client.list_artifacts(first.info.run_id, "checkpoints")] == ["checkpoints/best.pt"]
    best = client.download_artifacts(first.info.run_id, "checkpoints/best.pt", str(tmp_path / "dl"))
    assert set(torch.load(best, weights_only=True)["network"]) == {"weight", "bias"}

    experiment = first.info.experiment_id
    killed = client.create_run(experiment, tags={"stage": "prompter", "output_dir": first.data.tags["output_dir"]})
    other = client.create_run(experiment, tags={"stage": "prompter", "output_dir": str(tmp_path / "elsewhere")})
    engine, run = _stage_engine(tmp_path / "prompter", uri)
    engine.run([0, 1], max_epochs=2)
    resumed = client.search_runs([experiment], order_by=["attributes.start_time DESC"])[0]
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    assert client.get_run(other.info.run_id).info.status == "RUNNING"
    assert resumed.info.status == "FINISHED" and resumed.data.tags["resumed_runs"] == killed.info.run_id
    assert resumed.data.tags["resumed_from"] == str(tmp_path / "prompter" / "last.pt")
    assert client.get_run(first.info.run_id).info.status == "FINISHED"


def _compare(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "scripts.compare_runs", *args]
    return subprocess.run(cmd, cwd=BUNDLE_ROOT, env=bundle_env(), capture_output=True, text=True, timeout=300)


def test_compare_runs_refuses_a_missing_store(tmp_path: Path) -> None:
    typo = tmp_path / "typo.db"
    proc = _compare("--tracking_uri", f"sqlite:///{typo}")
    assert proc.returncode == 2 and f"no MLflow database {typo}" in proc.stderr, proc.stderr[-2000:]
    assert not typo.exists()  # no empty database made
    uri = f"http://127.0.0.1:{_closed_port()}"
    proc = _compare("--tracking_uri", uri)
    assert proc.returncode == 2 and f"no answer from {uri}" in proc.stderr, proc.stderr[-2000:]


def test_compare_runs_names_unknown_curve_metrics(tmp_path: Path) -> None:
    uri = default_tracking_uri(tmp_path)
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("promptnucseg")).info.run_id
    for step in (1, 2):
        client.log_metric(run_id, "pq", 0.1 * step, step=step)
    client.set_terminated(run_id)
    proc = _compare("--tracking_uri", uri, "--curves", "pq,pqq,f1_dte", "--plot", str(tmp_path / "c.png"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: no run logged 'pqq', 'f1_dte'" in proc.stderr and "Metrics of these runs: pq" in proc.stderr
    assert (tmp_path / "c.png").is_file()


# ----------------------------------------------------------------------------------------------- bundle runs
@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scripts.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("mlflow") / "data", 4, size=(96, 96),
                                   n_nuclei=(6, 10), num_classes=2, seed=0)


@pytest.fixture(scope="module")
def tracked(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Both stages trained with plain ``--tracking mlflow`` (default store), then the segmentor again with the
    settings file, another ``num_neg_prompts``, a run name and bfloat16 arithmetic, into the same store."""
    out = tmp_path_factory.mktemp("mlflow") / "train"
    first = run_bundle("training", "configs/train.json", "--tracking", "mlflow", "--stage", "both",
                       "--dataset_dir", str(dataset), "--output_dir", str(out), *TINY)
    uri = path_to_sqlite_uri(out / "mlflow.db")
    second = run_bundle("training", "configs/train.json", "--tracking", "configs/mlflow.json", "--stage",
                        "segmentor", "--num_neg_prompts", "2", "--run_name", "negs2", "--tracking_uri", uri,
                        "--segmentor#hparams#precision", "bfloat16",
                        "--dataset_dir", str(dataset), "--output_dir", str(out.parent / "train2"), *TINY)
    return {"uri": uri, "out": out, "logs": first.stdout + second.stdout}


def _runs(uri: str, experiment: str = "promptnucseg"):
    """``mlflow.search_runs`` on ``uri``; the global URI (and the ``MLFLOW_TRACKING_URI`` it sets, which the bundle
    subprocesses would inherit and prefer) is reset afterwards."""
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.search_runs(experiment_names=[experiment], order_by=["attributes.start_time ASC"])
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_training_stages_are_tracked(tracked: dict) -> None:
    runs = _runs(tracked["uri"])
    assert list(runs["tags.stage"]) == ["prompter", "segmentor", "segmentor"]
    assert (runs["status"] == "FINISHED").all()
    prompter, segmentor, second = (runs.iloc[i] for i in range(3))
    assert prompter["tags.session"] == segmentor["tags.session"] != second["tags.session"]
    assert prompter["tags.variant"] == "resnet_small" and segmentor["tags.variant"] == "conv_small"
    assert prompter["tags.dataset"] == "data" and second["tags.mlflow.runName"] == "negs2-segmentor"
    # parameters that matter
    assert prompter["params.anchor_step"] == "8" and prompter["params.bg_weight"] == "0.4"
    assert segmentor["params.sam_variant"] == "conv_small" and segmentor["params.focal_weight"] == "1.0"
    assert segmentor["params.num_neg_prompts"] == "1" and second["params.num_neg_prompts"] == "2"
    assert segmentor["params.seed"] == "0" and segmentor["params.max_epochs"] == "2"
    assert segmentor["params.precision"] == "float32" and second["params.precision"] == "bfloat16"
    assert Path(segmentor["params.dataset_dir"]).name == "data"

    client = mlflow.MlflowClient(tracked["uri"])
    for run, val_metric, loss_terms in ((prompter, "f1_det", ("loss_cls", "loss_reg", "loss_aux")),
                                        (segmentor, "pq", ("loss_mask", "loss_dice", "loss_iou"))):
        run_id = run["run_id"]
        # per-epoch losses and validation metrics (metric history, epoch as step)
        for key in ("loss", *loss_terms, val_metric):
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            assert steps == [1, 2], (run["tags.stage"], key, steps)
        assert len(client.get_metric_history(run_id, "train_loss")) == 2  # per iteration
        assert f"metrics.best_{val_metric}" in run and not np.isnan(run[f"metrics.best_{val_metric}"])
        # artifacts: the executed config and a validation overlay
        configs = [a.path for a in client.list_artifacts(run_id, "config")]
        overlays = [a.path for a in client.list_artifacts(run_id, "overlays")]
        assert len(configs) == 1 and configs[0].endswith(".json"), configs
        assert len(overlays) == 1 and overlays[0].endswith(".png"), overlays
        local = Path(client.download_artifacts(run_id, configs[0], str(tracked["out"] / "dl" / run_id)))
        assert json.loads(local.read_text())["prompter"]["hparams"]["anchor_step"] == 8
    assert "MLflow run" in tracked["logs"]
    # the model file from MLflow alone: each stage's best.pt, as logged
    from scripts.pipeline.model_file import export_model

    best = [client.download_artifacts(run["run_id"], "checkpoints/best.pt", str(tracked["out"] / "best" / stage))
            for run, stage in ((prompter, "prompter"), (segmentor, "segmentor"))]
    model = export_model(*best, tracked["out"] / "from_mlflow" / "model.pt")
    assert model.is_file() and model.stat().st_size > 1000


@pytest.mark.slow
def test_compare_runs_prints_runs_side_by_side_and_plots(tracked: dict, tmp_path: Path) -> None:
    plot = tmp_path / "curves.png"
    cmd = [sys.executable, "-m", "scripts.compare_runs", "--tracking_uri", tracked["uri"], "--experiment",
           "promptnucseg", "--stage", "segmentor", "--plot", str(plot)]
    proc = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=bundle_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "2 runs of experiment 'promptnucseg'" in proc.stdout
    header = next(line for line in lines if "negs2-segmentor" in line)
    assert header.split()[-1] == "negs2-segmentor" and header.split()[0].endswith("-segmentor")
    negs = next(line for line in lines if line.startswith("params.num_neg_prompts"))
    assert negs.split()[1:] == ["1", "2"]
    assert not any(line.startswith("params.sam_variant") for line in lines)  # equal: not listed
    assert any(line.startswith("metrics.pq ") for line in lines)
    assert plot.is_file() and plot.stat().st_size > 5000
    from PIL import Image

    assert Image.open(plot).size[0] > Image.open(plot).size[1]  # two panels side by side


@pytest.mark.slow
def test_evaluation_is_tracked(dataset: Path, tmp_path: Path) -> None:
    from scripts.data.readers import list_items

    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    for item in list_items(dataset, "auto"):
        record = item.load()
        inst = record.inst_map.copy()
        inst[inst == inst.max()] = 0  # one missed nucleus per image
        np.save(pred_dir / f"{record.name}.npy", inst)
    out = tmp_path / "eval"
    run_bundle("evaluating", "configs/evaluate.json", "--tracking", "mlflow", "--dataset_dir", str(dataset),
               "--pred_dir", str(pred_dir), "--output_dir", str(out))
    written = json.loads((out / "metrics.json").read_text())
    runs = _runs(path_to_sqlite_uri(out / "mlflow.db"))
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["tags.stage"] == "evaluation" and run["params.pred_dir"] == str(pred_dir)
    for key in ("pq", "aji", "aji_plus", "dq", "sq", "f1_det", "bpq", "mpq"):
        assert run[f"metrics.{key}"] == pytest.approx(written[key]), key
    assert 0 < run["metrics.pq"] < 1
    client = mlflow.MlflowClient(path_to_sqlite_uri(out / "mlflow.db"))
    assert "metrics.json" in [a.path for a in client.list_artifacts(run["run_id"])]
    assert len(client.list_artifacts(run["run_id"], "overlays")) == 1


@pytest.mark.slow
def test_unreachable_server_warns_and_training_goes_on(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    uri = f"http://127.0.0.1:{_closed_port()}"
    proc = run_bundle("training", "configs/train.json", "--tracking", "mlflow", "--tracking_uri", uri,
                      "--stage", "prompter", "--dataset_dir", str(dataset), "--output_dir", str(out),
                      *TINY, "--max_epochs", "1")
    assert f"MLflow tracking of prompter is off: no answer from {uri}" in proc.stdout
    assert "training goes on without tracking" in proc.stdout
    assert (out / "prompter" / "last.pt").is_file()


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """An ``mlflow server`` on 127.0.0.1 (SQLite store, served artifacts), stopped at the end."""
    port = _closed_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", path_to_sqlite_uri(tmp_path / "server.db"),
           "--artifacts-destination", str(tmp_path / "server_artifacts")]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=bundle_env(), start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
                time.sleep(1)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_tracking_server_uri(dataset: Path, tmp_path: Path, mlflow_server: str) -> None:
    run_bundle("training", "configs/train.json", "--tracking", "mlflow", "--tracking_uri", mlflow_server,
               "--experiment_name", "served", "--stage", "prompter", "--dataset_dir", str(dataset),
               "--output_dir", str(tmp_path / "out"), *TINY, "--max_epochs", "1")
    runs = _runs(mlflow_server, "served")
    assert list(runs["tags.stage"]) == ["prompter"] and runs.iloc[0]["status"] == "FINISHED"
    client = mlflow.MlflowClient(mlflow_server)
    assert [m.step for m in client.get_metric_history(runs.iloc[0]["run_id"], "f1_det")] == [1]
    assert len(client.list_artifacts(runs.iloc[0]["run_id"], "overlays")) == 1
    assert not (tmp_path / "out" / "mlflow.db").exists()  # nothing written to the default local store


@pytest.mark.slow
def test_store_failure_mid_run_warns_once_and_engine_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    import torch
    from ignite.engine import Engine, Events

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracker = StageRun("segmentor", tracking_uri=default_tracking_uri(tmp_path), params={"lr": 0.1},
                       iteration_log=False)
    engine = Engine(lambda e, batch: {"loss": torch.tensor(1.0)})

    @engine.on(Events.EPOCH_COMPLETED(once=2))
    def store_goes_away(e: Engine) -> None:  # registered first: runs before the tracker's epoch log
        tracker.client = mlflow.MlflowClient(f"http://127.0.0.1:{_closed_port()}")

    @engine.on(Events.EPOCH_COMPLETED)
    def epoch_metric(e: Engine) -> None:
        e.state.metrics["loss_mask"] = 1.0 / e.state.epoch

    tracker.attach(engine)
    engine.run([0, 1], max_epochs=3)
    assert engine.state.epoch == 3 and not tracker.enabled
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "scripts.training.tracking_run" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and "MLflow tracking of segmentor stopped: logging metrics failed" in warnings[0]
    client = mlflow.MlflowClient(default_tracking_uri(tmp_path))
    run_id = client.search_runs([client.get_experiment_by_name("promptnucseg").experiment_id])[0].info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "loss_mask")] == [1]
    assert client.get_run(run_id).data.params["lr"] == "0.1"
