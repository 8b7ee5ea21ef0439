"""The bundle as MONAI sees it: configs parse, metadata is complete, network_def runs on the declared input."""

import json

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import BUNDLE_ROOT

CONFIGS = BUNDLE_ROOT / "configs"


def test_metadata_has_class_table_and_network_format():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    table = meta["class_table"]
    assert [table[k]["name"] for k in sorted(table, key=int)] == ["Other", "Inflammatory", "Epithelial",
                                                                 "Spindle-shaped"]
    assert all(len(v["color"]) == 3 for v in table.values())
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 3 and image["value_range"] == [0, 255]
    assert set(meta["network_data_format"]["outputs"]["pred"]["channel_def"]) == {"inst_map", "type_map"}


@pytest.mark.parametrize("name", ["train.json", "inference.json", "evaluate.json", "multi_gpu_train.json",
                                  "mlflow.json"])
def test_configs_are_valid_json_with_run_ids(name):
    config = json.loads((CONFIGS / name).read_text())
    run_ids = {"train.json": "training", "inference.json": "inference", "evaluate.json": "evaluating"}
    if name in run_ids:
        assert run_ids[name] in config and config["run"] == f"@{run_ids[name]}"


def test_network_def_runs_on_declared_input(tmp_path):
    """Like ``verify_net_in_out``: instantiate ``network_def`` from inference.json, feed the declared input."""
    from scripts.io.atomic import atomic_torch_save
    from scripts.pipeline.model_file import export_model
    from scripts.prompter.net import Prompter
    from scripts.segmentor.build import build_segmentor

    torch.manual_seed(0)
    prompter = Prompter(num_classes=4)
    segmentor = build_segmentor("vit_tiny", image_size=256)
    atomic_torch_save({"network": prompter.state_dict(), "config": {
        "num_classes": 4, "backbone": "resnet_small", "levels": [2, 3, 4], "anchor_step": 8, "fpn_channels": 256,
        "mlp_hidden": 256, "class_names": ["Other", "Inflammatory", "Epithelial", "Spindle-shaped"]}}, tmp_path / "p.pt")
    atomic_torch_save({"network": segmentor.state_dict(), "config": {"variant": "vit_tiny", "image_size": 256}},
                      tmp_path / "s.pt")
    model = export_model(tmp_path / "p.pt", tmp_path / "s.pt", tmp_path / "model.pt")

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.read_meta(str(CONFIGS / "metadata.json"))
    parser.update({"bundle_root": str(BUNDLE_ROOT), "model_path": str(model), "device": "cpu"})
    net = parser.get_parsed_content("network_def")
    shape = [16 * 20, 16 * 18]  # "spatial_shape": ["16*n", "16*n"]
    out = net(torch.rand(1, 3, *shape) * 255)
    assert out["inst_map"].shape == tuple(shape) and out["inst_map"].dtype == torch.int32
    assert out["type_map"].shape == tuple(shape)
    n = int(out["inst_map"].max())
    assert out["points"].shape == (n, 2) and out["classes"].shape == (n,) and out["ious"].shape == (n,)
    assert net.options.prompter_tta is False
    parser.update({"pipeline#prompter_tta": "true"})  # as ``--pipeline#prompter_tta true`` on the command line
    assert parser.get_parsed_content("network_def", lazy=False).options.prompter_tta is True
    for word, value in (("False", False), ("no", False), ("1", True)):
        parser.update({"pipeline#prompter_tta": word})
        assert parser.get_parsed_content("network_def", lazy=False).options.prompter_tta is value
    parser.update({"pipeline#prompter_tta": "ture"})  # a typo is an error naming the option, never "true"
    with pytest.raises(Exception) as raised:
        parser.get_parsed_content("network_def", lazy=False)
    assert "prompter_tta must be true or false" in _messages(raised.value)


def test_missing_model_file_is_a_clear_error(tmp_path):
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.update({"bundle_root": str(BUNDLE_ROOT), "model_path": str(tmp_path / "absent.pt"), "device": "cpu"})
    with pytest.raises(Exception) as raised:
        parser.get_parsed_content("network_def")
    assert "model file not found" in _messages(raised.value) and "absent.pt" in _messages(raised.value)


def _messages(error: BaseException | None) -> str:
    """The messages of an exception and its causes (MONAI wraps the loader's error; the user sees the chain)."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__
    return "\n".join(messages)


def test_default_training_config_mixes_typed_and_untyped_data(shared_data):
    """``configs/train_default.json`` over ``train.json``: CoNSeP (typed) + MoNuSeg (untyped, class -1), each
    folder split 80/20, MoNuSeg's 1000 px images sampled like the 256 px tiles that cover them."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "train_default.json")])
    parser["bundle_root"] = str(BUNDLE_ROOT)
    parser["data_root"] = str(shared_data)
    assert parser.get_parsed_content("num_classes") == 4
    assert parser.get_parsed_content("untyped_class") == -1
    train, val = parser.get_parsed_content("train_items"), parser.get_parsed_content("val_items")
    assert len(train) + len(val) == 445 and sum(it.name.startswith("TCGA") for it in val) == 3
    names = [d["name"] for d in parser.get_parsed_content("train_data")]
    assert names.count(train[-1].name) == 15 and len(names) == len(train) - 10 + 150  # 10 MoNuSeg images x 15
    assert parser.get_parsed_content("segmentor#hparams#max_epochs") == 100
    assert parser.get_parsed_content("prompter#hparams#lr_decay_epoch") == 48


def test_prompter_with_scale_and_stain_augmentation_config(shared_data):
    """``configs/train_default_prompter_r18_aug.json``: its training samples are 256 px crops with integer labels,
    and every point lies on a nucleus of the (zoomed) instance map."""
    from monai.utils import set_determinism

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in ("train.json", "train_default.json",
                                                          "train_default_prompter_r18_aug.json")])
    parser["bundle_root"] = str(BUNDLE_ROOT)
    parser["data_root"] = str(shared_data)
    assert parser.get_parsed_content("prompter#hparams#lr_decay_epoch") == 96
    set_determinism(0)
    dataset = parser.get_parsed_content("prompter#train#dataset")
    for index in range(0, len(dataset), len(dataset) // 12):
        sample = dataset[index]
        assert sample["image"].shape == (3, 256, 256) and sample["inst"].dtype == torch.int32
        rows, cols = sample["points"][:, 1].round().long(), sample["points"][:, 0].round().long()
        assert (sample["inst"][0, rows, cols] > 0).all()
    set_determinism(None)


def test_segmentor_on_all_data_keeps_the_earlier_validation_images_held_out(shared_data):
    """``configs/train_default_segmentor_all.json``: CoNSeP and all 30 MoNuSeg images, each folder split 80/20 on
    its own, so the images 0.5.0 was validated on stay in validation; the 0.5.0 segmentor's geometry (4 px tokens,
    96 px window) fine-tuned at lr 1e-4."""
    def items(*names: str) -> tuple[list, list]:
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / name) for name in ("train.json", "train_default.json", *names)])
        parser["bundle_root"] = str(BUNDLE_ROOT)
        parser["data_root"] = str(shared_data)
        return parser, parser.get_parsed_content("train_items"), parser.get_parsed_content("val_items")

    _, _, earlier_val = items()
    parser, train, val = items("train_default_segmentor_all.json")
    assert {it.name for it in earlier_val} <= {it.name for it in val}
    assert not {it.name for it in train} & {it.name for it in val}
    assert len(train) + len(val) == 445 + 17
    hparams = parser.get_parsed_content("segmentor#hparams")
    assert (hparams["lr"], hparams["max_epochs"], hparams["lr_decay_epoch"]) == (0.0001, 12, 9)
    assert hparams["overrides"]["patch_size"] == 4 and hparams["overrides"]["decoder_window"] == 96
    assert hparams["init_checkpoint"].endswith("runs/default/segmentor_050.pt")


def test_prompter_from_scratch_on_all_data_config(shared_data):
    """``configs/train_default_prompter_r18_all.json`` over the scale-and-stain recipe (``..._r18_aug.json``): the
    same ResNet-18 prompter from random weights for 120 epochs, on CoNSeP and all 30 MoNuSeg images (each folder
    split 80/20, so 0.5.0's validation images stay held out), "Other" weighted 3, the weights averaged (EMA 0.99),
    the forward pass in bfloat16."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in ("train.json", "train_default.json",
                                                          "train_default_prompter_r18_aug.json",
                                                          "train_default_prompter_r18_all.json")])
    parser["bundle_root"] = str(BUNDLE_ROOT)
    parser["data_root"] = str(shared_data)
    earlier = ConfigParser()
    earlier.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "train_default.json")])
    earlier["bundle_root"], earlier["data_root"] = str(BUNDLE_ROOT), str(shared_data)
    train, val = parser.get_parsed_content("train_items"), parser.get_parsed_content("val_items")
    assert {it.name for it in earlier.get_parsed_content("val_items")} <= {it.name for it in val}
    assert len(train) + len(val) == 445 + 17 and not {it.name for it in train} & {it.name for it in val}
    hparams = parser.get_parsed_content("prompter#hparams")
    assert (hparams["backbone"], hparams["max_epochs"], hparams["lr_decay_epoch"], hparams["init_checkpoint"]) == (
        "resnet18", 120, 96, None)
    assert hparams["class_weights"] == [3.0, 1.0, 1.0, 1.0] and hparams["ema"] == 0.99
    assert hparams["precision"] == "bfloat16"
    assert parser.get_parsed_content("prompter#output_dir").endswith("prompter_r18_all")
    assert "RandHEStaind" in str(parser.get_parsed_content("prompter#train#preprocessing#transforms", lazy=True))
