"""Shared pytest set-up: the bundle's ``scripts`` package on the path, deterministic CPU threads, no telemetry, and
the trainings that run in the background beside the tests that do not need them."""

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
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


@pytest.fixture
def one_thread():
    """One intra-op thread for a test (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a shared 2-core
    machine, OpenMP spinning makes 2 threads up to 10x slower for small tensors."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's real datasets (``../shared/data``: all MoNuSeg training images, CoNSeP), for the few tests
    whose realism needs whole datasets. A user's clone has no such folder: there these tests are reported as not
    run, with the reason (``-ra``). In CI (``CI`` set), which has it, a missing folder is an error."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"shared data not found at {SHARED_DATA} (CI must have ../shared beside the clone)")
        pytest.skip(f"needs the project's datasets at {SHARED_DATA}, which a user's clone does not have")
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


# ---------------------------------------------------------------------------------------------------------------
# One small model trained on synthetic data, shared by the tests of training, pipeline, inference and MONAI Label.
SYNTHETIC_SIZE = 128
SYNTHETIC_TRAINING = [
    "--stage", "both", "--patch_size", str(SYNTHETIC_SIZE), "--val_fraction", "0.125", "--seed", "0",
    "--val_interval", "10",
    "--prompter#hparams#max_epochs", "25", "--prompter#hparams#lr", "0.001", "--prompter#hparams#fpn_channels", "64",
    "--prompter#hparams#mlp_hidden", "64", "--prompter#hparams#nms_radius", "8",
    # the CPU recipe of the default config (conv_small, balanced BCE + dice + IoU MSE, lr 1e-3), with a
    # 128-d mask decoder (2.3x faster steps than SAM's 256-d one) so the test trains in minutes; oracle PQ
    # plateaus near 0.45 from epoch 50 on this data (measured), far from converged
    "--segmentor#hparams#sam_variant", "conv_small", "--segmentor#hparams#max_epochs", "80", "--segmentor#hparams#lr", "0.001",
    "--segmentor#hparams#overrides", "{'prompt_dim': 128, 'decoder_mlp_dim': 512, 'decoder_heads': 4}",
    "--segmentor#hparams#num_prompts_per_image", "16", "--segmentor#hparams#batch_size", "8", "--segmentor#hparams#mask_loss", "bce",
    "--segmentor#hparams#mask_reduction", "balanced", "--segmentor#hparams#focal_weight", "1.0",
]


# ---------------------------------------------------------------------------------------------------------------
# Trainings in the background. The models some tests need take minutes to train; each such training starts in its
# own process (one thread) as soon as collection shows that a selected test needs it, and the modules whose tests
# need it run last, so the training overlaps the other tests on a 2-core machine. Its fixture waits for it.
class BackgroundTraining:
    """A bundle ``training`` run for the tests that use the fixture named ``fixture``.

    ``prepare(folder)`` writes the run's data into ``folder`` and returns (the arguments after ``--config_file
    configs/train.json``, a dict of what the tests need to know: data folders, ...), kept as ``info``.
    """

    def __init__(self, fixture: str, prepare: Callable[[Path], tuple[list[str], dict]]) -> None:
        self.fixture, self.prepare = fixture, prepare
        self.folder: Path | None = None
        self.info: dict = {}
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Write the data and start the training (once)."""
        if self.process is not None:
            return
        self.folder = Path(tempfile.mkdtemp(prefix=f"pns-{self.fixture}-"))
        args, self.info = self.prepare(self.folder)
        with open(self.folder / "training.log", "w") as log:
            self.process = subprocess.Popen(
                [BUNDLE_PYTHON, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json", *args],
                cwd=BUNDLE_ROOT, env=bundle_env(threads=1), stdout=log, stderr=subprocess.STDOUT)

    def result(self, timeout: float) -> str:
        """Wait for the training (started now if it was not); its log. A failed or too long run fails the test
        with the end of the log."""
        self.start()
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            code = f"killed after {timeout:.0f} s"
        log = (self.folder / "training.log").read_text()
        if code != 0:
            raise AssertionError(f"the training behind {self.fixture} exited {code}:\n{log[-6000:]}")
        return log

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def remove(self) -> None:
        self.stop()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


BACKGROUND_TRAININGS: dict[str, BackgroundTraining] = {}


def background_training(fixture: str, prepare: Callable[[Path], tuple[list[str], dict]]) -> BackgroundTraining:
    """The training that the fixture named ``fixture`` waits for, registered once (at import of its module)."""
    return BACKGROUND_TRAININGS.setdefault(fixture, BackgroundTraining(fixture, prepare))


def pytest_collection_modifyitems(config, items) -> None:
    """Start the trainings that the selected tests need and move the modules of those tests to the end (whole
    modules, so module fixtures are set up once)."""
    needed = [t for t in BACKGROUND_TRAININGS.values() if any(t.fixture in item.fixturenames for item in items)]
    if not needed or config.option.collectonly:
        return
    late = {item.path for item in items if any(t.fixture in item.fixturenames for t in needed)}
    items[:] = [item for item in items if item.path not in late] + [item for item in items if item.path in late]
    for training in needed:
        training.start()


def pytest_sessionfinish(session, exitstatus) -> None:
    for training in BACKGROUND_TRAININGS.values():
        training.remove()


def _synthetic_run(folder: Path) -> tuple[list[str], dict]:
    """Synthetic H&E data (hovernet layout, 128 px, 3 classes): ``train`` (64 images) and ``heldout`` (16 images,
    other seeds, never seen in training); the training's arguments."""
    from scripts.data.synthetic import write_synthetic_dataset

    size = (SYNTHETIC_SIZE, SYNTHETIC_SIZE)
    dirs = {
        "train": write_synthetic_dataset(folder / "train", 64, size=size, n_nuclei=(8, 16), num_classes=3, seed=0),
        "heldout": write_synthetic_dataset(folder / "heldout", 16, size=size, n_nuclei=(8, 16), num_classes=3,
                                           seed=1000),
    }
    args = ["--dataset_dir", str(dirs["train"]), "--output_dir", str(folder / "run"), *SYNTHETIC_TRAINING]
    return args, {"dirs": dirs, "run_dir": folder / "run"}


SYNTHETIC_RUN = background_training("synthetic_training", _synthetic_run)


@pytest.fixture(scope="session")
def synthetic_dirs() -> dict:
    """The synthetic data of :func:`_synthetic_run`: ``train`` and ``heldout`` folders."""
    SYNTHETIC_RUN.start()
    return SYNTHETIC_RUN.info["dirs"]


@pytest.fixture(scope="session")
def synthetic_training(synthetic_dirs) -> dict:
    """Both stages trained briefly through the bundle's ``training`` run on the synthetic train set (in the
    background, :class:`BackgroundTraining`), and a model exported from their best checkpoints.

    Returns the run folder, the model file and the training log.
    """
    from scripts.pipeline.model_file import export_model

    log = SYNTHETIC_RUN.result(timeout=2400)
    out = SYNTHETIC_RUN.info["run_dir"]
    model = export_model(out / "prompter" / "best.pt", out / "segmentor" / "best.pt", out / "model.pt")
    return {"run_dir": out, "model_path": model, "log": log}


@pytest.fixture(scope="session")
def trained_model_path(synthetic_training) -> Path:
    """A PromptNucSeg model file trained on synthetic data (see :func:`synthetic_training`)."""
    return synthetic_training["model_path"]
