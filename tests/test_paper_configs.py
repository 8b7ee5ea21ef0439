"""The paper's configurations (``configs/paper/{kumar,cpm17,pannuke}.json`` over ``configs/train.json``): they override
only keys ``train.json`` has, resolve to the authors' settings, require the official weights by option name, and
train both stages (on the CPU; on CUDA where there is a GPU) from weights written in the official key layouts (SAM
ViT-B as segment_anything saves it, a timm ConvNeXt-S classification state dict as ``.pth`` and as the hub's
``.safetensors``)."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import BUNDLE_ROOT, run_bundle
from scripts.data.readers.pannuke import CLASS_NAMES as PANNUKE_CLASSES
from scripts.data.synthetic import write_synthetic_dataset
from scripts.errors import real_error

PAPER_DIR = BUNDLE_ROOT / "configs" / "paper"
DATASETS = ("kumar", "cpm17", "pannuke")
OPTIONS = {"sam_variant", "sam_checkpoint", "backbone_weights", "+imports"}
"""Keys of a paper config that ``train.json`` does not have: the weights options (and their imports)."""
DEVICE = "cuda:0" if torch.cuda.is_available() else "cpu"
"""Where the trainings run: a GPU check (tools/gpu_check.sh) runs them on CUDA."""

# The authors' settings (shared/notes/official-code.md): what each config must resolve to.
OFFICIAL = {
    "kumar": {"levels": [2, 3, 4, 5], "anchor_step": 16, "bg_weight": 0.2, "nms_radius": 11, "mask_filter": True,
              "prompter_batch": 8, "segmentor_batch": 4, "prompts": 25},
    "cpm17": {"levels": [2, 3, 4, 5], "anchor_step": 16, "bg_weight": 0.25, "nms_radius": 12, "mask_filter": True,
              "prompter_batch": 8, "segmentor_batch": 8, "prompts": 25},
    "pannuke": {"levels": [2, 3, 4], "anchor_step": 8, "bg_weight": 0.4, "nms_radius": 12, "mask_filter": False,
                "prompter_batch": 16, "segmentor_batch": 16, "prompts": 20},
}


@pytest.fixture(autouse=True)
def in_bundle_root(monkeypatch) -> None:
    """Bundle commands run from ``bundle/``; the paper configs' ``%configs/paper/augment.json`` macros are read from
    there."""
    monkeypatch.chdir(BUNDLE_ROOT)


def _config_files(dataset: str) -> list[str]:
    return [str(BUNDLE_ROOT / "configs" / "train.json"), str(PAPER_DIR / f"{dataset}.json")]


def _parser(dataset: str, **updates) -> ConfigParser:
    """The layered configs as the bundle reads them (macros resolve from ``bundle/``, as the commands run)."""
    parser = ConfigParser()
    parser.read_config(_config_files(dataset))
    parser.update({"bundle_root": str(BUNDLE_ROOT), **updates})
    return parser


@pytest.mark.parametrize("dataset", DATASETS)
def test_paper_configs_override_only_keys_of_train_json(dataset) -> None:
    """Each hyperparameter stays stated once: a paper config changes ``train.json``'s keys (a typo would add an
    unused copy instead) and adds nothing but the weights options."""
    base = ConfigParser(ConfigParser.load_config_file(str(BUNDLE_ROOT / "configs" / "train.json")))
    paper = ConfigParser.load_config_file(str(PAPER_DIR / f"{dataset}.json"))
    unknown = []
    for key in paper:
        if key in OPTIONS:
            continue
        try:
            base[key]
        except (KeyError, IndexError, TypeError):
            unknown.append(key)
    assert unknown == []
    assert {k for k in paper if k.startswith(("prompter#hparams#", "segmentor#hparams#"))} >= {
        "prompter#hparams#backbone", "prompter#hparams#pretrained", "prompter#hparams#ema",
        "segmentor#hparams#sam_variant", "segmentor#hparams#sam_checkpoint"}


@pytest.mark.parametrize("dataset", DATASETS)
def test_paper_configs_resolve_to_the_authors_settings(dataset, tmp_path) -> None:
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")  # only its existence is checked here
    parser = _parser(dataset, sam_checkpoint=str(weights), backbone_weights=str(weights))
    prompter = parser.get_parsed_content("prompter#hparams")
    segmentor = parser.get_parsed_content("segmentor#hparams")
    want = OFFICIAL[dataset]
    assert prompter["backbone"] == "convnext_small" and prompter["pretrained"] == str(weights)
    for key in ("levels", "anchor_step", "bg_weight", "nms_radius", "mask_filter"):
        assert prompter[key] == want[key], key
    assert prompter["batch_size"] == want["prompter_batch"]
    assert prompter["lr"] == pytest.approx(1e-4 * want["prompter_batch"] / 8)  # 1e-4 per 8 images
    assert (prompter["max_epochs"], prompter["weight_decay"], prompter["grad_clip"], prompter["ema"]) == (
        200, 1e-4, 0.1, 0.99)
    assert prompter["lr_decay_epoch"] is None and prompter["reg_weight"] == 0.005 and prompter["match_alpha"] == 0.1
    assert segmentor["sam_variant"] == "vit_b" and segmentor["sam_checkpoint"] == str(weights)
    assert segmentor["num_prompts_per_image"] == want["prompts"] and segmentor["batch_size"] == want["segmentor_batch"]
    assert (segmentor["mask_loss"], segmentor["focal_weight"], segmentor["dice_weight"], segmentor["iou_weight"],
            segmentor["mask_reduction"]) == ("focal", 20.0, 1.0, 1.0, "mean")
    assert (segmentor["lr"], segmentor["weight_decay"], segmentor["lr_decay_epoch"]) == (1e-4, 1e-4, 160)
    assert parser.get_parsed_content("patch_size") == 256 and parser.get_parsed_content("num_neg_prompts") == 1
    # the stages' official augmentations, as far as MONAI has them
    prompter_steps = [type(t).__name__ for t in parser.get_parsed_content("prompter#train#preprocessing").transforms]
    segmentor_steps = [type(t).__name__ for t in parser.get_parsed_content("segmentor#train#preprocessing").transforms]
    assert {"RandFlipd", "RandRotate90d", "RandAffined", "RandSimulateLowResolutiond", "RandGaussianSmoothd",
            "RandGaussianNoised", "RandScaleIntensityd"} <= set(prompter_steps)
    assert {"RandFlipd", "RandRotate90d", "Rand2DElasticd", "RandGaussianSmoothd", "RandGaussianNoised"} <= set(
        segmentor_steps)
    assert prompter_steps[-1] == "NucleusPointsd" and "SampleNucleusPromptsd" in segmentor_steps
    assert "Rand2DElasticd" not in prompter_steps and "RandAffined" not in segmentor_steps
    assert _parser(dataset, sam_checkpoint=str(weights), backbone_weights=str(weights), sam_variant="vit_h"
                   ).get_parsed_content("segmentor#hparams#sam_variant") == "vit_h"


@pytest.mark.parametrize("dataset", DATASETS)
def test_weights_are_required_by_option_name(dataset, tmp_path) -> None:
    """No weights, or a path that does not exist: an error naming ``--sam_checkpoint`` / ``--backbone_weights``
    (nothing is downloaded)."""
    present = tmp_path / "present.pth"
    present.write_bytes(b"")
    cases = [({"backbone_weights": str(present)}, "segmentor#hparams#sam_checkpoint",
              ValueError, r"sam_checkpoint is not set: pass --sam_checkpoint"),
             ({"backbone_weights": str(present), "sam_checkpoint": str(tmp_path / "sam_vit_b_01ec64.pth")},
              "segmentor#hparams#sam_checkpoint", FileNotFoundError, r"sam_checkpoint: .*sam_vit_b_01ec64\.pth"),
             ({"sam_checkpoint": str(present)}, "prompter#hparams#pretrained",
              ValueError, r"backbone_weights is not set: pass --backbone_weights"),
             ({"sam_checkpoint": str(present), "backbone_weights": str(tmp_path / "convnext_small.pth")},
              "prompter#hparams#pretrained", FileNotFoundError, r"backbone_weights: .*convnext_small\.pth")]
    for updates, key, error, message in cases:
        with pytest.raises(RuntimeError) as raised:
            _parser(dataset, **updates).get_parsed_content(key)
        cause = real_error(raised.value)  # what a failed bundle command prints first (scripts/errors.py)
        assert isinstance(cause, error) and re.search(message, str(cause)), repr(cause)


# ------------------------------------------------------ training (on the CPU; on CUDA where a GPU is)
@pytest.fixture(scope="module")
def official_weights(tmp_path_factory) -> Iterator[dict[str, Path]]:
    """Random weights in the official file layouts (``scripts/stand_in_weights.py``): SAM ViT-B as
    ``sam_vit_b_01ec64.pth`` holds it, a timm ConvNeXt-S classifier as ``.pth`` and as the hub's ``.safetensors``."""
    from scripts.stand_in_weights import write_stand_in_weights

    folder = tmp_path_factory.mktemp("official_weights")
    yield write_stand_in_weights(folder)
    shutil.rmtree(folder)  # 0.6 GB


@pytest.fixture
def run_dir(tmp_path) -> Iterator[Path]:
    """The training's output folder, removed afterwards (its checkpoints hold vit_b and ConvNeXt-S with their
    optimizer states: about 2.5 GB)."""
    yield tmp_path / "run"
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


def _train(dataset: str, data: Path, out: Path, sam: Path, backbone: Path) -> float:
    """The documented command with ``--max_epochs 1``, shortened to one iteration of batch 1 per stage (vit_b and
    ConvNeXt-S are slow on a CPU); returns the wall time in seconds."""
    start = time.monotonic()
    run_bundle("training", f"['configs/train.json','configs/paper/{dataset}.json']", "--stage", "both",
               "--dataset_dir", str(data), "--max_epochs", "1", "--output_dir", str(out),
               "--sam_checkpoint", str(sam), "--backbone_weights", str(backbone),
               "--epoch_length", "1", "--prompter#hparams#batch_size", "1", "--segmentor#hparams#batch_size", "1",
               "--device", DEVICE, timeout=1800)
    return time.monotonic() - start


def _check_run(out: Path, dataset: str, sam: Path, backbone: Path) -> None:
    """Both stages' checkpoints hold networks built from the official weights, the paper's settings in their
    configs, and the prompter's weight average (decay 0.99) next to its trained weights."""
    from scripts.backbones import load_weights_file

    want = OFFICIAL[dataset]
    prompter = torch.load(out / "prompter" / "last.pt", weights_only=True)
    config = prompter["config"]
    assert (config["backbone"], config["levels"], config["anchor_step"], config["ema"]) == (
        "convnext_small", want["levels"], want["anchor_step"], 0.99)
    timm_state = load_weights_file(backbone)
    for timm_key, key in (("stem.0.weight", "backbone.body.stem_0.weight"),
                          ("stages.2.blocks.26.conv_dw.weight", "backbone.body.stages_2.blocks.26.conv_dw.weight"),
                          ("stages.3.blocks.2.mlp.fc2.weight", "backbone.body.stages_3.blocks.2.mlp.fc2.weight")):
        step = (prompter["network"][key] - timm_state[timm_key]).abs().max()  # one step of lr 1e-4 / 8
        assert step < 1e-3, key  # a fresh initialisation would differ by about 0.02
    # the average starts from the loaded weights: ema = 0.99 * start + 0.01 * trained, i.e. it moved 1 % of the
    # step (a least-squares fit over the stem, whose first AdamW step is 1.25e-5 on every weight)
    start = timm_state["stem.0.weight"].double()
    step = prompter["network"]["backbone.body.stem_0.weight"].double() - start
    moved = prompter["ema"]["backbone.body.stem_0.weight"].double() - start
    assert float((moved * step).sum() / (step * step).sum()) == pytest.approx(0.01, rel=0.02)
    segmentor = torch.load(out / "segmentor" / "last.pt", weights_only=True)
    assert (segmentor["config"]["variant"], segmentor["config"]["mask_loss"], segmentor["config"]["focal_weight"],
            segmentor["config"]["num_prompts_per_image"]) == ("vit_b", "focal", 20.0, want["prompts"])
    assert "ema" not in segmentor
    sam_state = torch.load(sam, weights_only=True)
    for key, value in sam_state.items():
        if key.startswith("prompt_encoder."):  # frozen: exactly the file's
            torch.testing.assert_close(segmentor["network"][key], value, rtol=0, atol=0, msg=key)
    assert sam_state["image_encoder.pos_embed"].shape == (1, 64, 64, 768)
    assert segmentor["network"]["image_encoder.pos_embed"].shape == (1, 16, 16, 768)  # 256 px: 16 x 16 tokens


@pytest.mark.slow
def test_kumar_trains_on_cpu_with_official_weights(official_weights, tmp_path, run_dir) -> None:
    """Kumar (MoNuSeg's ``.tif`` + Aperio ``.xml`` layout, untyped), 256 px synthetic images."""
    data = write_synthetic_dataset(tmp_path / "kumar", n_images=3, size=(256, 256), n_nuclei=(15, 25), num_classes=0,
                                   seed=1, dataset_format="monuseg")
    seconds = _train("kumar", data, run_dir, official_weights["sam"], official_weights["convnext"])
    print(f"kumar, vit_b + ConvNeXt-S, one iteration per stage on {DEVICE}: {seconds:.0f} s")
    _check_run(run_dir, "kumar", official_weights["sam"], official_weights["convnext"])


@pytest.mark.slow
def test_cpm17_trains_on_cpu_with_official_weights(official_weights, tmp_path, run_dir) -> None:
    """CPM-17 (HoVer-Net's ``Images/`` + ``Labels/*.mat`` layout with instance maps only)."""
    data = write_synthetic_dataset(tmp_path / "cpm17", n_images=3, size=(256, 256), n_nuclei=(15, 25),
                                   num_classes=0, seed=2, dataset_format="hovernet")
    seconds = _train("cpm17", data, run_dir, official_weights["sam"], official_weights["convnext"])
    print(f"cpm17, vit_b + ConvNeXt-S, one iteration per stage on {DEVICE}: {seconds:.0f} s")
    _check_run(run_dir, "cpm17", official_weights["sam"], official_weights["convnext"])


@pytest.mark.slow
def test_pannuke_trains_on_cpu_with_official_weights(official_weights, tmp_path, run_dir) -> None:
    """PanNuke (one fold in its exact layout, five classes), the backbone from the hub's ``.safetensors``."""
    data = write_synthetic_dataset(tmp_path / "pannuke", n_images=3, size=(256, 256), n_nuclei=(15, 25),
                                   num_classes=5, seed=3, dataset_format="pannuke")
    seconds = _train("pannuke", data, run_dir, official_weights["sam"], official_weights["convnext_hub"])
    print(f"pannuke, vit_b + ConvNeXt-S, one iteration per stage on {DEVICE}: {seconds:.0f} s")
    _check_run(run_dir, "pannuke", official_weights["sam"], official_weights["convnext_hub"])
    config = torch.load(run_dir / "prompter" / "last.pt", weights_only=True)["config"]
    assert config["num_classes"] == 5 and config["class_names"] == list(PANNUKE_CLASSES.values())
