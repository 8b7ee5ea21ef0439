"""Checkpoints: atomic writes, and a training killed mid-run resumes without losing finished epochs."""

import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import BUNDLE_PYTHON, BUNDLE_ROOT, bundle_env, run_bundle
from scripts.io.atomic import atomic_torch_save
from scripts.io.checkpoints import load_checkpoint
from scripts.training.checkpoints import BestMetric
from scripts.data.synthetic import write_synthetic_dataset


def test_atomic_save_leaves_no_partial_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"a": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"a": Unpicklable()}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(3))  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary left behind


def test_load_checkpoint_names_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_checkpoint(tmp_path / "nothere.pt")


def test_best_metric_ignores_nan_and_keeps_state():
    best = BestMetric()
    assert best.update(0.5, 1) and not best.update(float("nan"), 2) and not best.update(0.4, 3)
    assert best.update(0.6, 4)
    other = BestMetric()
    other.load_state_dict(best.state_dict())
    assert (other.value, other.epoch) == (0.6, 4)


def _epoch_of(path):
    try:
        return int(load_checkpoint(path)["trainer"]["epoch"])
    except Exception:  # not written yet
        return 0


@pytest.mark.slow
def test_training_killed_mid_run_resumes_from_last_epoch(tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", 10, size=(64, 64), n_nuclei=(4, 8), num_classes=2, seed=1)
    out = tmp_path / "run"
    args = ["--stage", "prompter", "--dataset_dir", str(data), "--output_dir", str(out), "--patch_size", "64",
            "--val_fraction", "0.2", "--prompter#hparams#batch_size", "4"]
    cmd = [BUNDLE_PYTHON, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
           *args, "--max_epochs", "1000"]
    last = out / "prompter" / "last.pt"
    proc = subprocess.Popen(cmd, cwd=BUNDLE_ROOT, env=bundle_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while _epoch_of(last) < 2:
            assert proc.poll() is None, "training stopped before it was killed"
            assert time.time() < deadline, "no checkpoint of epoch 2 within 300 s"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = _epoch_of(last)
    assert killed_at >= 2
    state = load_checkpoint(last)  # loads: the file was replaced atomically, never half-written
    assert {"network", "optimizer", "trainer", "best_metric"} <= set(state)
    iterations = state["trainer"]["iteration"]

    log = run_bundle("training", "configs/train.json", *args, "--max_epochs", str(killed_at + 1)).stdout
    assert f"resumed from {last} at epoch {killed_at}" in log
    # the evaluator's best is restored too: its log never reports a best below the checkpoint's
    key_lines = [line for line in log.splitlines() if "Key metric" in line and "best value:" in line]
    assert key_lines, log[-2000:]
    logged_best = float(key_lines[-1].split("best value:")[1].split()[0])
    assert logged_best >= state["best_metric"]["value"] - 1e-9
    resumed = load_checkpoint(last)
    assert resumed["trainer"]["epoch"] == killed_at + 1
    assert resumed["trainer"]["iteration"] == iterations + iterations // killed_at  # one more epoch only
    assert (out / "prompter" / "best.pt").is_file()


def test_warm_start_prompter_from_a_training_checkpoint(tmp_path):
    """``prompter#hparams#init_checkpoint``: a prompter starts from the ``network`` entry of another run's best.pt; a
    checkpoint of another network is refused by name."""
    from scripts.training.checkpoints import warm_start
    from scripts.prompter.net import Prompter

    small = dict(backbone="resnet_small", fpn_channels=32, mlp_hidden=32, anchor_step=8)
    torch.manual_seed(0)
    trained = Prompter(num_classes=4, **small)
    atomic_torch_save({"network": trained.state_dict(), "metric": 0.7}, tmp_path / "best.pt")
    torch.manual_seed(1)
    fresh = Prompter(num_classes=4, **small)
    assert warm_start(fresh, tmp_path / "best.pt") is fresh
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value, msg=name)
    other_classes = Prompter(num_classes=1, **small)  # a class head of another size keeps its fresh weights
    head = {k: v.clone() for k, v in other_classes.state_dict().items() if v.shape != trained.state_dict()[k].shape}
    assert head
    warm_start(other_classes, tmp_path / "best.pt")
    for name, value in head.items():
        torch.testing.assert_close(other_classes.state_dict()[name], value, msg=name)
    torch.save({"network": {"unrelated.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no parameter matches.*Prompter"):
        warm_start(fresh, tmp_path / "other.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="tensor.pt is not a checkpoint dict"):
        warm_start(fresh, tmp_path / "tensor.pt")


def _tiny_training(save_dir, resume="true", max_epochs=2):
    """A two-batch engine with a TrainingCheckpointer (no evaluator: best.pt follows last.pt)."""
    from ignite.engine import Engine

    from scripts.training.checkpoints import TrainingCheckpointer

    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def step(engine, batch):
        opt.zero_grad()
        loss = net(batch).pow(2).mean()
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    engine = Engine(step)
    checkpointer = TrainingCheckpointer(str(save_dir), {"network": net, "optimizer": opt}, resume=resume)
    checkpointer.attach(engine)
    return engine, checkpointer, [torch.ones(1, 2), torch.zeros(1, 2)]


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_last_resumes_from_the_previous_checkpoint(tmp_path, caplog):
    """``last.pt`` is rotated to ``last.prev.pt`` before each new one; a truncated ``last.pt`` is named in a warning,
    set aside, and the training resumes from ``last.prev.pt``."""
    engine, checkpointer, data = _tiny_training(tmp_path)
    engine.run(data, max_epochs=2)
    assert load_checkpoint(tmp_path / "last.pt")["trainer"]["epoch"] == 2
    assert load_checkpoint(tmp_path / "last.prev.pt")["trainer"]["epoch"] == 1  # the previous one is kept
    _truncate(tmp_path / "last.pt")

    engine, checkpointer, data = _tiny_training(tmp_path)
    with caplog.at_level("WARNING", logger="scripts.training.checkpoints"):
        engine.run(data, max_epochs=3)
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert f"checkpoint {tmp_path / 'last.pt'} cannot be read" in warnings
    assert checkpointer.resumed_from == tmp_path / "last.prev.pt"
    assert engine.state.epoch == 3 and engine.state.iteration == 6  # epochs 2 and 3 trained after epoch 1
    assert load_checkpoint(tmp_path / "last.pt")["trainer"]["epoch"] == 3
    assert load_checkpoint(tmp_path / "last.prev.pt")["trainer"]["epoch"] == 2  # not the damaged file
    assert (tmp_path / "last.damaged.pt").is_file()


def test_no_readable_checkpoint_is_a_clear_error_and_resume_false_starts_afresh(tmp_path):
    engine, _, data = _tiny_training(tmp_path)
    engine.run(data, max_epochs=2)
    _truncate(tmp_path / "last.pt")
    _truncate(tmp_path / "last.prev.pt", keep=0.1)
    engine, _, data = _tiny_training(tmp_path)
    expected = r"last\.pt and .*last\.prev\.pt cannot be read.*delete them.*--resume false"
    with pytest.raises(RuntimeError, match=expected):
        engine.run(data, max_epochs=3)
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "last.prev.pt").is_file()  # left for the user to see
    for value in ("false", "False", "0", False):
        engine, checkpointer, data = _tiny_training(tmp_path, resume=value)
        assert checkpointer.resume is False
        engine.run(data, max_epochs=1)  # the damaged files are not read
        assert checkpointer.resumed_from is None and engine.state.iteration == 2
    assert load_checkpoint(tmp_path / "last.pt")["trainer"]["epoch"] == 1
    with pytest.raises(ValueError, match="resume must be true or false.*'flase'"):
        _tiny_training(tmp_path, resume="flase")
