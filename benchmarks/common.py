"""What the scripts in ``benchmarks/`` share: paths, the machine description, timing, the bundle's commands, the
evaluation helpers, benchmark inputs, a random stand-in model and MONAI's HoVer-Net.

Importing this module puts ``bundle/`` on ``sys.path`` (once), so that ``scripts.*`` imports work after it::

    from common import BUNDLE, Stopwatch, machine  # first: the bundle's path
    from scripts.pipeline.model_file import load_model
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "bundle"
MODEL = BUNDLE / "models" / "model.pt"  # the shipped model
DOCS = REPO / "docs"
SHARED_DATA = REPO.parent / "shared" / "data"
if str(BUNDLE) not in sys.path:
    sys.path.insert(0, str(BUNDLE))

if TYPE_CHECKING:
    from scripts.data.records import NucleusRecord
    from scripts.prompter.net import Prompter

TILE = 256  # the pipeline's segmentor tile, px
HOVERNET_OUT = 164  # HoVer-Net fast mode: the central 164 px of a 256 px input


# ---------------------------------------------------------------------------------------------- machine
def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else ``platform.processor()``, else ``"unknown"``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(threads: int | None = None) -> dict:
    """What a benchmark runs on, now: ``cpu`` (model name), ``cores`` (logical CPUs visible), ``threads`` (torch
    intra-op threads: ``threads``, else torch's current count), ``omp_threads`` (``OMP_NUM_THREADS``, which child
    processes inherit, or ``"default"``), ``torch`` and ``python`` (versions), ``nice``, ``load`` (load averages over
    1, 5 and 15 min; NaN where unknown)."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads or torch.get_num_threads(),
            "omp_threads": os.environ.get("OMP_NUM_THREADS", "default"), "torch": torch.__version__,
            "python": platform.python_version(), "nice": os.nice(0) if hasattr(os, "nice") else 0,
            "load": os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3}


def machine_line(info: dict | None = None) -> str:
    """``info`` (default: :func:`machine` now) in one line: CPU, cores, torch threads of child processes, 1-min load."""
    info = info or machine()
    return f"{info['cpu']}, {info['cores']} cores, torch threads {info['omp_threads']}, load {info['load'][0]:.1f}"


# ---------------------------------------------------------------------------------------------- timing
class Stopwatch:
    """Wall seconds (``time.perf_counter``) of timed runs, kept per name: a pipeline's pieces (:meth:`wrap`), a
    block (:meth:`section`), one call (:meth:`time`) or repeated calls (:meth:`repeat`); sums and counts per name
    (:attr:`seconds`, :attr:`calls`), medians and minima.

    ``sync``: drain the CUDA queue before and after each run (GPU timing; no effect without CUDA).
    """

    def __init__(self, sync: bool = False) -> None:
        self.runs: dict[str, list[float]] = defaultdict(list)
        self._sync = torch.cuda.synchronize if sync and torch.cuda.is_available() else (lambda: None)

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Time the block as one run of ``name``."""
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.runs[name].append(time.perf_counter() - start)

    def wrap(self, name: str, fn: Callable) -> Callable:
        """``fn`` timed: each call is a run of ``name``."""
        def timed(*args, **kwargs):
            with self.section(name):
                return fn(*args, **kwargs)
        return timed

    def time(self, name: str, fn: Callable, *args, **kwargs) -> Any:
        """``fn(*args, **kwargs)`` timed as a run of ``name``; its result."""
        with self.section(name):
            return fn(*args, **kwargs)

    def repeat(self, name: str, fn: Callable[[], Any], repeats: int, warmup: int = 0) -> list[float]:
        """``fn()`` ``warmup`` times untimed, then ``repeats`` times as runs of ``name``; those runs' seconds."""
        for _ in range(warmup):
            fn()
        for _ in range(repeats):
            self.time(name, fn)
        return self.runs[name][len(self.runs[name]) - repeats:]

    @property
    def seconds(self) -> dict[str, float]:
        """Total seconds per name (0 for a name never timed)."""
        return defaultdict(float, {name: sum(runs) for name, runs in self.runs.items()})

    @property
    def calls(self) -> dict[str, int]:
        """Runs per name (0 for a name never timed)."""
        return defaultdict(int, {name: len(runs) for name, runs in self.runs.items()})

    def median(self, name: str) -> float:
        return statistics.median(self.runs[name])

    def fastest(self, name: str) -> float:
        return min(self.runs[name])


@contextmanager
def instrumented(network, watch: Stopwatch) -> Iterator[None]:
    """Time the pipeline's pieces while in the block: instance attributes shadow the methods of the prompter,
    the segmentor and the pipeline, and ``scripts.pipeline.promptnucseg``'s prompt decoding is wrapped; all undone
    after. Names: "prompter network", "prompt decoding + NMS", "encoder", "decoder", "stitching"."""
    import scripts.pipeline.promptnucseg as pipeline

    patches = [(network.segmentor, "decode_windows", "decoder"), (network, "_paint", "stitching"),
               (network, "_relabel", "stitching")]
    # the networks as the pipeline runs them: themselves, or their copies with bfloat16 weights (``lowered``)
    for prompter in {id(m): m for m in (network.prompter, network.lowered(network.prompter))}.values():
        patches.append((prompter, "forward", "prompter network"))
    for segmentor in {id(m): m for m in (network.segmentor, network.lowered(network.segmentor))}.values():
        patches += [(segmentor, "encode", "encoder"), (segmentor, "encode_whole", "encoder")]
    module_patches = [("decode_prompts", "prompt decoding + NMS"), ("point_nms", "prompt decoding + NMS")]
    originals = {name: getattr(pipeline, name) for name, _ in module_patches}
    for obj, attr, name in patches:
        obj.__dict__[attr] = watch.wrap(name, getattr(obj, attr))
    for attr, name in module_patches:
        setattr(pipeline, attr, watch.wrap(name, originals[attr]))
    try:
        yield
    finally:
        for obj, attr, _ in patches:
            obj.__dict__.pop(attr, None)
        for attr, fn in originals.items():
            setattr(pipeline, attr, fn)


# ---------------------------------------------------------------------------------------------- the bundle
def bundle(*args: str, env: dict[str, str] | None = None) -> str:
    """``python -m monai.bundle run *args`` from ``bundle/`` (``env``: variables added to the environment); its
    output (stdout and stderr); exits with the command's last output on failure."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
    proc = subprocess.run(cmd, cwd=BUNDLE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}")
    return proc.stdout


# ---------------------------------------------------------------------------------------------- evaluation
COLUMNS = ["pq", "dq", "sq", "aji", "aji_plus", "f1_det"]


def evaluate(folder: str, scale: float, method_args: list[str], model: Path, out: Path,
             images: list[str] | None = None) -> dict:
    """The bundle's ``evaluating`` command on the held-out images (``--subset val``) of ``SHARED_DATA / folder``
    resampled by ``scale`` (``images``: only those names), outputs in ``out``; its metrics.json."""
    cmd = ["evaluating", "--config_file", "configs/evaluate.json",
           "--dataset_dir", str(SHARED_DATA / folder), "--subset", "val", "--scale", str(scale),
           "--model_path", str(model), "--output_dir", str(out), *method_args]
    if images:
        cmd += ["--images", json.dumps(images)]
    bundle(*cmd)
    return json.loads((out / "metrics.json").read_text())


def fmt(value: float | None, decimals: int = 3) -> str:
    """A metric with ``decimals`` decimals, "–" where undefined."""
    return "–" if value is None else f"{value:.{decimals}f}"


def cells(metrics: dict, columns: Sequence[str] = COLUMNS) -> str:
    """Markdown table cells of ``metrics`` (a metrics.json) for ``columns``, "–" where undefined."""
    return " | ".join(fmt(metrics.get(c)) for c in columns)


# ---------------------------------------------------------------------------------------------- inputs
def monuseg_files() -> list[Path]:
    """The MoNuSeg images of the shared data (1000 x 1000 px TIFFs), sorted; empty without the shared data."""
    return sorted((SHARED_DATA / "monuseg_train").glob("*.tif"))


def he_crops(size: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` RGB uint8 (size, size, 3) H&E crops at random places of the MoNuSeg images (synthetic without)."""
    rng = np.random.default_rng(seed)
    files = monuseg_files()
    if not files:
        from scripts.data.synthetic import make_synthetic_record

        return [make_synthetic_record((size, size), n_nuclei=size * size // 1500, num_classes=4, seed=seed + k).image
                for k in range(count)]
    from scripts.data.readers.common import read_image

    sources = [read_image(f) for f in files]
    crops = []
    for k in range(count):
        src = sources[(seed + k) % len(sources)]
        y, x = rng.integers(0, src.shape[0] - size + 1), rng.integers(0, src.shape[1] - size + 1)
        crops.append(src[y : y + size, x : x + size].copy())
    return crops


def slide_mosaic(size: int, block: int = 512, tissue: float = 0.75, holes: float = 0.1, seed: int = 0) -> np.ndarray:
    """An RGB uint8 (size, size, 3) slide-like mosaic: ``block`` px H&E crops over the top-left ``tissue`` x
    ``tissue`` of the image, a fraction ``holes`` of those blocks left white, glass (white) elsewhere."""
    rng = np.random.default_rng(seed)
    mosaic = np.full((size, size, 3), 255, np.uint8)
    n = max(1, int(round(size * tissue / block)))
    blocks = [(r, c) for r in range(n) for c in range(n)]
    blank = set(rng.permutation(len(blocks))[: int(round(holes * len(blocks)))].tolist())
    crops = iter(he_crops(block, len(blocks), seed))
    for k, (r, c) in enumerate(blocks):
        crop = next(crops)
        if k not in blank:
            mosaic[r * block : (r + 1) * block, c * block : (c + 1) * block] = crop
    return mosaic


# ---------------------------------------------------------------------------------------------- a random model
def as_batch(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> float (1, 3, H, W) in [0, 255]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float()


@torch.no_grad()
def calibrate_prompter(prompter: Prompter, image: np.ndarray, prompts_per_tile: float, nms_radius: float = 12,
                       tile: int = TILE) -> int:
    """Set two biases of a (random) prompter so that it finds about ``prompts_per_tile`` prompts per ``tile`` x
    ``tile`` px of ``image`` (RGB uint8 (H, W, 3)) after mask filtering and NMS; returns the count on ``image``.

    The nuclear-map bias puts sigmoid(aux) above 0.5 on half of ``image``; the background-class bias is shifted
    (bisection) so that only the anchors whose best class logit beats background by the most are nuclei.
    """
    from scripts.prompter.decode import decode_prompts

    x = as_batch(image)
    prompter.mask_head[-1].bias -= prompter(x)["aux_logits"][0, 0].median()
    outputs = prompter(x)
    logits = outputs["pred_logits"]
    margin = logits[0, :, :-1].max(-1).values - logits[0, :, -1]
    target = prompts_per_tile * image.shape[0] * image.shape[1] / tile**2

    def count(shift: float) -> int:
        shifted = logits.clone()
        shifted[..., -1] += shift
        found = decode_prompts({**outputs, "pred_logits": shifted}, image.shape[:2], nms_radius=nms_radius)
        return len(found[0]["points"])

    # bisection on the fraction f of anchors called nuclei (shift = the (1 - f) quantile of the margins); at most
    # 30 % of the anchors, which bounds the point NMS's work
    lo, hi = 0.0, 0.3
    for _ in range(25):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if count(float(torch.quantile(margin, 1 - mid))) > target else (mid, hi)
    prompter.class_head.layers[-1].bias[-1] += float(torch.quantile(margin, 1 - lo))
    found = decode_prompts(prompter(x), image.shape[:2], nms_radius=nms_radius)
    return len(found[0]["points"])


def random_model_file(path: str | Path, image: np.ndarray, prompts_per_tile: float = 40, variant: str = "vit_tiny",
                      image_size: int = TILE, fpn_channels: int = 256, mlp_hidden: int = 256, seed: int = 0,
                      finds_nothing: bool = False) -> Path:
    """A model file of randomly initialised networks (prompter ``resnet_small``; segmentor ``variant`` at
    ``image_size`` px) written with :func:`scripts.pipeline.model_file.export_model`, its prompter calibrated on
    ``image`` (see :func:`calibrate_prompter`) — a cheap stand-in for a trained model, for tests and benchmarks.

    ``finds_nothing``: the nuclear map is below 0.5 everywhere, so the pipeline finds no nucleus in any image.
    """
    from scripts.data.records import load_class_table
    from scripts.pipeline.model_file import export_model
    from scripts.prompter.net import Prompter
    from scripts.segmentor.build import build_segmentor
    from scripts.io.atomic import atomic_torch_save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    class_table = load_class_table()
    torch.manual_seed(seed)
    prompter = Prompter(num_classes=len(class_table), backbone="resnet_small", levels=(2, 3, 4), anchor_step=8,
                        fpn_channels=fpn_channels, mlp_hidden=mlp_hidden).eval()
    segmentor = build_segmentor(variant, image_size).eval()
    calibrate_prompter(prompter, image, prompts_per_tile)
    if finds_nothing:
        with torch.no_grad():
            prompter.mask_head[-1].bias.fill_(-1e4)
    p_cfg = {"num_classes": len(class_table), "backbone": "resnet_small", "levels": [2, 3, 4], "anchor_step": 8,
             "fpn_channels": fpn_channels, "mlp_hidden": mlp_hidden,
             "class_names": [class_table[k]["name"] for k in sorted(class_table)]}
    s_cfg = {"variant": variant, "image_size": image_size, "overrides": {}}
    parts = path.parent / f".{path.stem}_parts"
    parts.mkdir(exist_ok=True)
    atomic_torch_save({"network": prompter.state_dict(), "config": p_cfg}, parts / "prompter.pt")
    atomic_torch_save({"network": segmentor.state_dict(), "config": s_cfg}, parts / "segmentor.pt")
    return export_model(parts / "prompter.pt", parts / "segmentor.pt", path)


# ---------------------------------------------------------------------------------------------- HoVer-Net
class HoverNetRunner:
    """MONAI HoVer-Net, fast mode, and its instance / type post-processing."""

    def __init__(self) -> None:
        from monai.apps.pathology.transforms.post.dictionary import (
            HoVerNetInstanceMapPostProcessingd,
            HoVerNetNuclearTypePostProcessingd,
        )
        from monai.networks.nets import HoVerNet

        torch.manual_seed(0)
        self.network = HoVerNet(mode="fast", in_channels=3, out_classes=5).eval()
        self.instances = HoVerNetInstanceMapPostProcessingd(activation="softmax")
        self.types = HoVerNetNuclearTypePostProcessingd(activation="softmax")

    @torch.no_grad()
    def forward(self, image: np.ndarray) -> dict:
        """The network on an (H, W, 3) uint8 RGB tile, on the network's device."""
        device = next(self.network.parameters()).device
        return self.network(torch.from_numpy(image.transpose(2, 0, 1).copy()).float()[None].to(device) / 255.0)

    @staticmethod
    def outputs_from_truth(record: NucleusRecord) -> dict:
        """HoVer-Net-shaped outputs (C, 164, 164) made from the tile's central ground truth (confident logits)."""
        from monai.transforms import ComputeHoVerMaps

        margin = (TILE - HOVERNET_OUT) // 2
        inst = record.inst_map[margin : margin + HOVERNET_OUT, margin : margin + HOVERNET_OUT]
        types = record.type_map if record.type_map is not None else (record.inst_map > 0).astype(np.int32)
        types = types[margin : margin + HOVERNET_OUT, margin : margin + HOVERNET_OUT]
        fg = torch.from_numpy((inst > 0).astype(np.float32))
        nuclear = torch.stack([1 - fg, fg]) * 8.0
        type_logits = torch.nn.functional.one_hot(torch.from_numpy(types.astype(np.int64)).clamp(0, 4), 5)
        hover = torch.as_tensor(ComputeHoVerMaps()(inst[None].astype(np.int64)))
        # a network's maps are never exactly flat (MONAI rejects a constant map: tiles without nuclei)
        hover = hover + 1e-3 * torch.randn(hover.shape, generator=torch.Generator().manual_seed(0))
        return {
            "nucleus_prediction": nuclear,
            "horizontal_vertical": hover,
            "type_prediction": type_logits.permute(2, 0, 1).float() * 8.0,
        }

    def postprocess(self, outputs: dict) -> dict:
        """Instance and type post-processing (MONAI transforms, CPU) of :meth:`forward`-shaped ``outputs``."""
        return self.types(self.instances(dict(outputs)))
