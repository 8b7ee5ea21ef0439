"""Paper Tables 8 and 9: the segmentor as nucleus classifier ([cls] token, ``--classifier segmentor``) and the joint
training of both networks on one shared image encoder (``--stage joint``), from the parts to the bundle commands."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import conftest
import numpy as np
import pytest
import torch
from scripts.io.atomic import atomic_torch_save
from scripts.io.checkpoints import load_checkpoint
from scripts.pipeline.model_file import (
    export_joint_model,
    export_model,
    load_model,
    part_state_dict,
    read_model_file,
)
from scripts.pipeline.promptnucseg import PromptNucSeg
from scripts.prompter.net import Prompter
from scripts.segmentor.build import build_segmentor
from scripts.segmentor.classifier import (
    PromptClassesd,
    check_classifier,
    classes_from_logits,
    part_class_names,
)
from scripts.segmentor.loss import SegmentorLoss
from scripts.segmentor.net import decode_at_points
from scripts.training.engine import run_stages
from scripts.training.joint import JointNetwork
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"prompt_dim": 32, "decoder_mlp_dim": 64, "decoder_heads": 2}
PROMPTER_CONFIG = {"num_classes": 1, "backbone": "resnet_small", "levels": [2, 3, 4], "anchor_step": 8,
                   "fpn_channels": 32, "mlp_hidden": 32, "class_names": []}


def _segmentor(num_classes: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_segmentor("conv_small", image_size=128, num_classes=num_classes, **{**SMALL, **overrides})


def _prompter() -> Prompter:
    torch.manual_seed(1)
    config = {k: v for k, v in PROMPTER_CONFIG.items() if k != "class_names"}
    return Prompter(**{**config, "levels": tuple(config["levels"])})


# ------------------------------------------------------------------------------------------ Table 8: the [cls] token
def test_classifying_decoder_keeps_sams_names_and_adds_a_cls_token_and_head() -> None:
    plain, classifying = _segmentor(), _segmentor(num_classes=3)
    extra = set(classifying.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) <= set(classifying.state_dict())
    assert extra and all(k.startswith(("mask_decoder.cls_token.", "mask_decoder.cls_head.")) for k in extra)
    assert plain.num_classes == 0 and classifying.num_classes == 3 and classifying.config["num_classes"] == 3
    images = torch.rand(2, 3, 128, 128) * 255
    coords = torch.tensor([[[[20.0, 30.0], [60.0, 60.0]]] * 3] * 2)
    coords[:, 1] = torch.tensor([[100.0, 90.0], [20.0, 30.0]])
    labels = torch.tensor([[[1, 0]] * 3] * 2)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    out = classifying.eval()(images, coords, labels, valid)
    assert out["class_logits"].shape == (2, 3, 4) and "class_logits" not in plain.eval()(images, coords, labels)
    assert (out["class_logits"][~valid] == 0).all()
    # the [cls] token attends to the prompt: another point, other logits
    assert not torch.allclose(out["class_logits"][0, 0], out["class_logits"][0, 1])


def test_decoding_with_classes_needs_a_cls_token_and_official_checkpoints_leave_it_fresh(tmp_path: Path) -> None:
    plain = _segmentor()
    embedding = plain.encode(torch.rand(1, 3, 128, 128) * 255)
    coords, labels = torch.tensor([[[40.0, 40.0]]]), torch.tensor([[1]])
    with pytest.raises(ValueError, match="no \\[cls\\] token"):
        decode_at_points(plain, embedding[0], coords, labels, with_classes=True)
    assert len(decode_at_points(plain, embedding[0], coords, labels)) == 3
    torch.save(plain.state_dict(), tmp_path / "sam.pth")  # an "official" checkpoint: SAM's keys only
    loaded = build_segmentor("conv_small", image_size=128, checkpoint=tmp_path / "sam.pth", num_classes=2, **SMALL)
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())
    logits, _, _, classes = decode_at_points(loaded, embedding[0], coords, labels, with_classes=True)
    assert classes.shape == (1, 3) and logits.shape[0] == 1


def test_prompt_classes_are_each_nucleus_majority_type() -> None:
    inst = np.zeros((1, 20, 20), np.int32)
    inst[0, 2:6, 2:6], inst[0, 10:14, 10:14], inst[0, 15:19, 2:6] = 4, 7, 9
    types = np.zeros_like(inst)
    types[0, 2:6, 2:6] = 2
    types[0, 2:3, 2:6] = 3  # 4 px of class 3 against 12 of class 2
    types[0, 10:14, 10:14] = 1  # nucleus 9 has no typed pixel
    data = {"inst": inst, "type": types, "prompt_ids": torch.tensor([7, 4, 9, 0])}
    out = PromptClassesd(untyped_class=-1)(data)
    assert out["prompt_classes"].tolist() == [0, 1, -1, -1]  # indices: type - 1; unknown and padding -1
    assert PromptClassesd(untyped_class=0)(data)["prompt_classes"].tolist() == [0, 1, 0, -1]
    assert PromptClassesd()({"inst": inst, "prompt_ids": torch.tensor([9, 0])})["prompt_classes"].tolist() == [0, -1]
    with pytest.raises(ValueError, match="prompt ids \\[5\\]"):
        PromptClassesd()({**data, "prompt_ids": torch.tensor([5])})


def test_class_term_is_a_focal_loss_over_prompts_of_known_class() -> None:
    loss = SegmentorLoss(mask_loss="bce", mask_reduction="balanced", focal_weight=1.0, class_weight=1.0)
    masks = torch.zeros(1, 3, 16, 16)
    masks[..., 4:10, 4:10] = 1
    mask_logits, iou = masks * 20 - 10, torch.ones(1, 3)
    right = torch.tensor([[[9.0, -9, -9, -9], [-9, 9, -9, -9], [-9, -9, 9, -9]]])
    classes = torch.tensor([[0, 1, -1]])
    plain = loss(mask_logits, iou, masks)
    good = loss(mask_logits, iou, masks, class_logits=right, classes=classes)
    bad = loss(mask_logits, iou, masks, class_logits=right.roll(1, dims=-1), classes=classes)
    assert "cls" not in plain and good["cls"] < 1e-6 and bad["cls"] > 1.0
    assert torch.isclose(bad["loss"], plain["loss"] + bad["cls"])
    # the unknown prompt (-1) and the invalid one do not count
    wrong_third = right.clone()
    wrong_third[0, 2] = torch.tensor([-9.0, -9, -9, 9])
    assert loss(mask_logits, iou, masks, class_logits=wrong_third, classes=classes)["cls"] < 1e-6
    valid = torch.tensor([[True, False, True]])
    mixed = right.clone()
    mixed[0, 1] = right[0, 0]
    assert loss(mask_logits, iou, masks, valid, class_logits=mixed, classes=classes)["cls"] < 1e-6
    logits = right.clone().requires_grad_()
    loss(mask_logits, iou, masks, class_logits=logits, classes=torch.full((1, 3), -1))["loss"].backward()
    assert logits.grad is not None and (logits.grad == 0).all()
    with pytest.raises(ValueError, match="without their classes"):
        loss(mask_logits, iou, masks, class_logits=right)
    with pytest.raises(ValueError, match="classes must lie in 0..2"):
        loss(mask_logits, iou, masks, class_logits=right, classes=torch.tensor([[0, 3, 1]]))


def test_classifier_option_and_which_part_gets_the_classes() -> None:
    names = {1: "a", 2: "b"}
    assert part_class_names("prompter", "prompter", names) == names and part_class_names("segmentor", "prompter",
                                                                                          names) is None
    assert part_class_names("segmentor", "segmentor", names) == names and part_class_names("prompter", "segmentor",
                                                                                            names) is None
    assert part_class_names("segmentor", "segmentor", None) is None
    with pytest.raises(ValueError, match="classifier must be one of"):
        check_classifier("segmentr")
    classes, scores = classes_from_logits(torch.tensor([[0.0, 5.0, 1.0, 9.0], [3.0, 0.0, 0.0, 0.0]]))
    assert classes.tolist() == [2, 1]  # never the background (the last logit)
    assert torch.allclose(scores, torch.tensor([np.exp(5) / (np.exp(5) + np.exp(9) + 1 + np.e),
                                                np.exp(3) / (np.exp(3) + 3)]).float())


def _whole_window_segmentor(num_classes: int) -> nn.Module:
    """8 px tokens, 64 px decoding windows; every pixel of each prompt's window is foreground; the [cls] head
    always says class 3 (its last layer: zero weights, biases favouring the background, then class index 2)."""
    segmentor = _segmentor(num_classes=num_classes, patch_size=8, decoder_window=64).eval()
    if num_classes:
        head = segmentor.mask_decoder.cls_head.layers[-1]
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.tensor([0.0, 1.0, 5.0, 9.0]))
    real = segmentor.decode_windows

    def whole_window(windows, coords, labels, **kwargs):
        logits, *rest = real(windows, coords, labels, **kwargs)
        return (torch.ones_like(logits), *rest)

    segmentor.decode_windows = whole_window
    return segmentor


def test_the_pipeline_takes_each_nucleus_class_from_the_classifier() -> None:
    image = torch.rand(3, 128, 128) * 255
    prompts = {"points": torch.tensor([[16.0, 16.0], [112.0, 112.0]]), "classes": torch.tensor([1, 2]),
               "scores": torch.tensor([0.9, 0.8])}
    segmentor = _whole_window_segmentor(num_classes=3)
    by_segmentor = PromptNucSeg(nn.Identity(), segmentor, classifier="segmentor", min_area=1)(image, prompts)
    by_prompter = PromptNucSeg(nn.Identity(), segmentor, min_area=1)(image, prompts)
    assert len(by_segmentor["classes"]) == len(by_prompter["classes"]) == 2
    assert by_segmentor["classes"].tolist() == [3, 3]
    expected = np.exp(5) / (1 + np.e + np.exp(5) + np.exp(9))
    assert torch.allclose(by_segmentor["scores"], torch.full((2,), expected, dtype=torch.float32))
    assert set(np.unique(by_segmentor["type_map"]).tolist()) == {0, 3}
    assert sorted(by_prompter["classes"].tolist()) == [1, 2]
    assert (by_segmentor["inst_map"] == by_prompter["inst_map"]).all()
    with pytest.raises(ValueError, match="needs a segmentor with a \\[cls\\] head"):
        PromptNucSeg(nn.Identity(), _segmentor(), classifier="segmentor")
    with pytest.raises(ValueError, match="assembly official does not take the segmentor's classes"):
        PromptNucSeg(nn.Identity(), segmentor, classifier="segmentor", assembly="official")(image, prompts)


def test_oracle_validation_of_a_classifying_segmentor_scores_its_classes() -> None:
    """The segmentor's validation step (true nuclei as prompts) gives a class map from the [cls] head when the
    segmentor classifies and the data has types, so the stage's metric has mPQ; a plain segmentor gives none."""
    from types import SimpleNamespace

    from scripts.segmentor.prompts import oracle_prompts
    from scripts.training.engine import OracleSegmentorEvalStep

    inst = np.zeros((1, 1, 128, 128), np.int32)
    inst[0, 0, 10:20, 10:20], inst[0, 0, 100:115, 90:110] = 1, 2
    batch = {"image": torch.rand(1, 3, 128, 128) * 255, "inst": torch.from_numpy(inst),
             "type": torch.from_numpy(np.where(inst > 0, 1, 0).astype(np.int32)), "name": ["a"]}
    step = OracleSegmentorEvalStep(oracle_prompts, num_neg=1)
    outputs = {}
    for classes in (3, 0):
        engine = SimpleNamespace(state=SimpleNamespace(device="cpu"), network=_whole_window_segmentor(classes),
                                 fire_event=lambda event: None)
        outputs[classes] = step(engine, batch)[0]
    classified, plain = outputs[3], outputs[0]
    assert set(np.unique(classified["pred_inst"]).tolist()) == {0, 1, 2}
    assert (classified["pred_type"] == np.where(classified["pred_inst"] > 0, 3, 0)).all()  # the head says 3
    assert (classified["type"] == batch["type"][0, 0].numpy()).all()
    assert "pred_type" not in plain and (plain["pred_inst"] == classified["pred_inst"]).all()
    del batch["type"]  # untyped data: nothing to score the classes against
    engine = SimpleNamespace(state=SimpleNamespace(device="cpu"), network=_whole_window_segmentor(3),
                             fire_event=lambda event: None)
    assert "pred_type" not in step(engine, batch)[0]


def _save_stage_checkpoints(folder: Path, segmentor_classes: list[str]) -> tuple[Path, Path]:
    segmentor = _segmentor(num_classes=len(segmentor_classes))
    atomic_torch_save({"network": _prompter().state_dict(), "config": PROMPTER_CONFIG}, folder / "p.pt")
    atomic_torch_save({"network": segmentor.state_dict(),
                       "config": {"variant": "conv_small", "image_size": 128, "overrides": SMALL,
                                  "num_classes": len(segmentor_classes), "class_names": segmentor_classes}},
                      folder / "s.pt")
    return folder / "p.pt", folder / "s.pt"


def test_the_model_file_records_the_classifier_and_older_files_load_unchanged(tmp_path: Path) -> None:
    model = export_model(*_save_stage_checkpoints(tmp_path, ["Tumour", "Immune", "Stroma"]), tmp_path / "m.pt",
                         storage="int8")
    content = read_model_file(model)
    assert content["classifier"] == "segmentor"
    assert [entry["name"] for entry in content["class_table"].values()] == ["Tumour", "Immune", "Stroma"]
    network = load_model(model)
    assert network.classifier == "segmentor" and network.segmentor.num_classes == 3
    plain = read_model_file(export_model(*_save_stage_checkpoints(tmp_path, []), tmp_path / "plain.pt"))
    assert plain["classifier"] == "prompter" and plain["class_table"] == {}
    older = {k: v for k, v in plain.items() if k != "classifier"}  # a promptnucseg/3 file written before the key
    atomic_torch_save(older, tmp_path / "older.pt")
    assert load_model(tmp_path / "older.pt").classifier == "prompter"
    shipped = Path(__file__).resolve().parents[1] / "bundle" / "models" / "model.pt"
    network = load_model(shipped)  # promptnucseg/2, before the [cls] token existed
    assert network.classifier == "prompter" and network.segmentor.num_classes == 0


# ------------------------------------------------------------------------------------------ Table 9: joint training
def test_joint_network_runs_one_backbone_for_both_networks() -> None:
    prompter, segmentor = _prompter(), _segmentor(num_classes=2)
    joint = JointNetwork(prompter, segmentor)
    assert joint.problem is None and joint.prompter.backbone is joint.segmentor.image_encoder.backbone
    assert prompter.backbone is not segmentor.image_encoder.backbone  # the stage networks are left as they were
    own, shared = joint.part_parameters("prompter"), joint.part_parameters("segmentor")
    assert not {id(p) for p in own} & {id(p) for p in shared}
    trainable = {id(p) for p in joint.parameters() if p.requires_grad}
    assert {id(p) for p in own} | {id(p) for p in shared} == trainable
    images = torch.rand(2, 3, 128, 128) * 255
    coords, labels = torch.tensor([[[[30.0, 40.0]]]] * 2), torch.ones(2, 1, 1, dtype=torch.long)
    joint.eval()
    with torch.no_grad():
        out = joint(images, coords, labels)
        assert torch.allclose(out["prompter"]["pred_logits"], joint.prompter(images)["pred_logits"], atol=1e-5)
        alone = joint.segmentor(images, coords, labels)
        assert torch.allclose(out["segmentor"]["mask_logits"], alone["mask_logits"], atol=1e-4)
        assert torch.allclose(out["segmentor"]["class_logits"], alone["class_logits"], atol=1e-5)
    # the prompter's loss alone reaches the segmentor's encoder through the shared backbone
    joint.train()
    joint(images, coords, labels)["prompter"]["pred_logits"].sum().backward()
    assert joint.segmentor.image_encoder.backbone.stem[0].weight.grad.abs().sum() > 0
    assert joint.segmentor.image_encoder.neck[0].weight.grad is None
    with pytest.raises(ValueError, match="image_size 128"):
        joint(torch.rand(1, 3, 96, 96) * 255, coords[:1], labels[:1])


def test_joint_network_names_what_cannot_be_shared() -> None:
    torch.manual_seed(0)
    other_backbone = JointNetwork(Prompter(num_classes=1, backbone="resnet18", fpn_channels=32, mlp_hidden=32),
                                  _segmentor())
    assert "--prompter#hparams#backbone resnet_small" in other_backbone.problem
    with pytest.raises(ValueError, match="prompter#hparams#backbone"):
        other_backbone(torch.rand(1, 3, 128, 128) * 255, torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 1, dtype=torch.long))
    vit = JointNetwork(_prompter(), build_segmentor("vit_tiny", image_size=128))
    assert "sam_variant 'vit_tiny'" in vit.problem and "conv_small" in vit.problem
    with pytest.raises(ValueError, match="must be one of"):
        run_stages("jointly", {})
    with pytest.raises(ValueError, match="no trainer configured for stage 'joint'"):
        run_stages("joint", {})


def test_export_of_a_joint_checkpoint_gives_both_parts_the_shared_backbone(tmp_path: Path) -> None:
    joint = JointNetwork(_prompter(), _segmentor())
    with torch.no_grad():
        joint.segmentor.image_encoder.backbone.stem[0].weight.add_(1.0)  # as training would change it
    segmentor_config = {"variant": "conv_small", "image_size": 128, "overrides": SMALL, "num_classes": 0}
    atomic_torch_save({"network": joint.state_dict(), "config": {"prompter": PROMPTER_CONFIG,
                                                                  "segmentor": segmentor_config, "joint": {}}},
                      tmp_path / "joint.pt")
    model = read_model_file(export_joint_model(tmp_path / "joint.pt", tmp_path / "model.pt"))
    prompter_state, segmentor_state = part_state_dict(model, "prompter"), part_state_dict(model, "segmentor")
    backbone = [k for k in prompter_state if k.startswith("backbone.")]
    assert backbone and all(torch.equal(prompter_state[k], segmentor_state["image_encoder." + k]) for k in backbone)
    assert torch.equal(prompter_state["backbone.stem.0.weight"], joint.prompter.backbone.stem[0].weight)
    network = load_model(tmp_path / "model.pt")
    assert network.classifier == "prompter"
    for name, part in (("prompter", network.prompter), ("segmentor", network.segmentor)):
        expected = getattr(joint, name).state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in part.state_dict().items())
    atomic_torch_save({"network": joint.prompter.state_dict(), "config": PROMPTER_CONFIG}, tmp_path / "stage.pt")
    with pytest.raises(KeyError, match="not a joint training checkpoint"):
        export_joint_model(tmp_path / "stage.pt", tmp_path / "x.pt")


# ------------------------------------------------------------------------------------------ through the bundle
def run_bundle(run_id: str, config_file: str, *args: str, timeout: float = 900,
               check: bool = True) -> subprocess.CompletedProcess:
    """:func:`conftest.run_bundle` on one thread (two spin against each other on a busy 2-core machine)."""
    cmd = [conftest.BUNDLE_PYTHON, "-m", "monai.bundle", "run", run_id, "--config_file", config_file, *args]
    proc = subprocess.run(cmd, cwd=conftest.BUNDLE_ROOT, env=conftest.bundle_env(threads=1), check=False,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc


SIZE = 128
# a small decoder on 8 px tokens, each prompt decoded on the 32 px window centred on it: measured, its [cls] head
# learns the synthetic classes in 60 steps (held-out accuracy 0.60), while on the whole 128 px tile with 16 px tokens
# it stays at the class prior for 150 steps (it must first find the prompted nucleus among a dozen)
TINY_SEGMENTOR = {"prompt_dim": 64, "decoder_mlp_dim": 128, "decoder_heads": 2, "patch_size": 8, "decoder_window": 32}
TINY_NETWORKS = [
    "--patch_size", str(SIZE), "--val_fraction", "0.2", "--seed", "0",
    "--prompter#hparams#fpn_channels", "32", "--prompter#hparams#mlp_hidden", "32", "--prompter#hparams#lr", "0.001",
    "--prompter#hparams#nms_radius", "8",
    "--segmentor#hparams#overrides", repr(TINY_SEGMENTOR), "--segmentor#hparams#num_prompts_per_image", "16",
]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic H&E (128 px, 3 classes of distinct appearance): 20 training images, 8 held out."""
    from scripts.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("tables_8_9")
    return {"train": write_synthetic_dataset(root / "train", 20, size=(SIZE, SIZE), n_nuclei=(8, 14), num_classes=3,
                                             seed=0),
            "heldout": write_synthetic_dataset(root / "heldout", 8, size=(SIZE, SIZE), n_nuclei=(8, 14),
                                               num_classes=3, seed=500)}


def _oracle_class_accuracy(segmentor: nn.Module, data_dir: Path) -> float:
    """Share of held-out nuclei whose class the segmentor's [cls] head gets right, prompted at the true points."""
    from scripts.data.points import instance_points
    from scripts.data.readers import read_dataset
    from scripts.inference import image_tensor
    from scripts.segmentor.prompts import knn_negative_prompts

    right = total = 0
    for record in read_dataset(data_dir):
        points, classes, _ = instance_points(record.inst_map, record.type_map)
        coords, labels = (torch.from_numpy(a) for a in knn_negative_prompts(points, 1))
        with torch.no_grad():
            embedding = segmentor.encode(image_tensor(record.image)[None])[0]
            logits = decode_at_points(segmentor, embedding, coords, labels, with_classes=True)[3]
        right += int((classes_from_logits(logits)[0] - 1 == torch.from_numpy(classes)).sum())
        total += len(classes)
    return right / total


@pytest.mark.slow
def test_segmentor_as_classifier_through_the_bundle(synthetic: dict[str, Path], tmp_path: Path) -> None:
    """``--classifier segmentor``: a class-agnostic prompter and a segmentor with a [cls] head that learns the
    classes; the exported model says so, and the bundle's evaluation takes its classes from the segmentor."""
    out = tmp_path / "run"
    proc = run_bundle("training", "configs/train.json", "--stage", "both", "--classifier", "segmentor",
                      "--dataset_dir", str(synthetic["train"]), "--output_dir", str(out), *TINY_NETWORKS,
                      "--prompter#hparams#max_epochs", "1", "--segmentor#hparams#max_epochs", "30",
                      "--segmentor#hparams#batch_size", "8", "--val_interval", "15", timeout=900)
    prompter, segmentor = (load_checkpoint(out / part / "last.pt") for part in ("prompter", "segmentor"))
    assert prompter["config"]["num_classes"] == 1 and prompter["config"]["class_names"] == []
    names = segmentor["config"]["class_names"]
    assert segmentor["config"]["num_classes"] == len(names) >= 3
    segmentor_log = proc.stdout.split("training stage: segmentor")[1]
    assert "loss_cls" in segmentor_log
    assert re.search(r"mpq: 0\.\d+", segmentor_log), segmentor_log[-2000:]  # its validation scores the classes
    model = export_model(out / "prompter" / "last.pt", out / "segmentor" / "last.pt", tmp_path / "model.pt")
    content = read_model_file(model)
    assert content["classifier"] == "segmentor"
    assert [v["name"] for v in content["class_table"].values()] == names
    network = load_model(model)
    torch.manual_seed(0)
    untrained = build_segmentor("conv_small", image_size=SIZE, num_classes=len(names), **TINY_SEGMENTOR).eval()
    accuracy, chance = _oracle_class_accuracy(network.segmentor, synthetic["heldout"]), _oracle_class_accuracy(
        untrained, synthetic["heldout"])
    print(f"held-out class accuracy of the [cls] head with true prompts: {accuracy:.3f} (untrained {chance:.3f})")
    assert accuracy >= 0.5 and accuracy > chance + 0.25  # measured 0.60 (untrained 0.20; 3 classes)
    # the bundle's evaluation with true points as prompts: the classes (mPQ) come from the segmentor
    run_bundle("evaluating", "configs/evaluate.json", "--dataset_dir", str(synthetic["heldout"]), "--model_path",
               str(model), "--prompts", "oracle", "--output_dir", str(tmp_path / "eval"))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n_images"] == 8 and metrics["pq"] > 0.2 and 0.0 < metrics["mpq"] < metrics["pq"]  # 0.35, 0.24
    typo = run_bundle("training", "configs/train.json", "--classifier", "segmentr", "--dataset_dir",
                      str(synthetic["train"]), "--output_dir", str(tmp_path / "typo"), check=False)
    assert typo.returncode != 0 and "classifier must be one of ('prompter', 'segmentor'), got 'segmentr'" in typo.stdout


@pytest.mark.slow
def test_joint_training_through_the_bundle(synthetic: dict[str, Path], tmp_path: Path) -> None:
    """``--stage joint``: one trainer, both losses going down, checkpoints and an MLflow run like the other stages,
    a resumable run, and a model file that ``run inference`` uses."""
    import mlflow
    from scripts.training.tracking import default_tracking_uri

    out = tmp_path / "run"
    args = ["--stage", "joint", "--dataset_dir", str(synthetic["train"]), "--output_dir", str(out), *TINY_NETWORKS,
            "--max_epochs", "6", "--val_interval", "3"]
    proc = run_bundle("training", "configs/train.json", "--tracking", "mlflow", *args, timeout=900)
    assert "training stage: joint" in proc.stdout and "training stage: prompter" not in proc.stdout
    assert {p.name for p in (out / "joint").glob("*.pt")} >= {"best.pt", "last.pt"}
    assert not (out / "prompter").exists() and not (out / "segmentor").exists()
    uri = default_tracking_uri(out)
    mlflow.set_tracking_uri(uri)
    try:
        runs = mlflow.search_runs(experiment_names=["promptnucseg"])
    finally:
        mlflow.set_tracking_uri(None)
    assert list(runs["tags.stage"]) == ["joint"] and runs.iloc[0]["status"] == "FINISHED"
    client = mlflow.MlflowClient(uri)
    run_id = runs.iloc[0]["run_id"]
    for part in ("prompter", "segmentor"):
        history = [m.value for m in sorted(client.get_metric_history(run_id, f"loss_{part}"), key=lambda m: m.step)]
        assert len(history) == 6 and history[-1] < history[0], (part, history)
    assert [m.step for m in client.get_metric_history(run_id, "pq")] == [3, 6]
    assert runs.iloc[0]["params.segmentor/lr"] == "0.001" and runs.iloc[0]["params.prompter_weight"] == "1.0"
    # resuming a finished run does nothing more
    again = run_bundle("training", "configs/train.json", *args)
    assert "training already reached max_epochs=6" in again.stdout
    # the model file: both parts with the one backbone, run by the bundle's inference
    model = export_joint_model(out / "joint" / "last.pt", tmp_path / "model.pt")
    content = read_model_file(model)
    prompter_state, segmentor_state = part_state_dict(content, "prompter"), part_state_dict(content, "segmentor")
    assert all(torch.equal(v, segmentor_state["image_encoder." + k]) for k, v in prompter_state.items()
               if k.startswith("backbone."))
    run_bundle("inference", "configs/inference.json", "--model_path", str(model), "--input_dir",
               str(synthetic["heldout"] / "Images"), "--output_dir", str(tmp_path / "predictions"))
    assert len(list((tmp_path / "predictions").glob("*_inst.tif"))) == 8
    misfit = run_bundle("training", "configs/train.json", "--stage", "joint", "--prompter#hparams#backbone",
                        "resnet18", "--dataset_dir", str(synthetic["train"]), "--output_dir", str(tmp_path / "misfit"),
                        *TINY_NETWORKS, "--max_epochs", "1", check=False)
    assert misfit.returncode != 0 and "set --prompter#hparams#backbone resnet_small" in misfit.stdout
