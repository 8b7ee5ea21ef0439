"""Training data plumbing: deterministic grouped split, loading, padding, validation crops, collation."""

import numpy as np
import pytest
import torch

from scripts.data.datasets import (
    CropBoxd,
    ListCollate,
    LoadNucleusItemd,
    PadToMultipled,
    grid_crop_items,
    repeat_by_area,
    split_items,
    train_val_items,
)
from scripts.data.records import DatasetItem, NucleusRecord


def _item(name: str, size=(40, 50)) -> DatasetItem:
    def load():
        inst = np.zeros(size, np.int32)
        inst[5:10, 5:10] = 3
        return NucleusRecord(name=name, image=np.full((*size, 3), 200, np.uint8), inst_map=inst)

    return DatasetItem(name=name, source=name, loader=load)


def test_split_keeps_tiles_of_one_image_together_and_is_deterministic():
    items = [_item(f"train_{i}_{k:03d}") for i in range(1, 11) for k in range(4)]
    train, val = split_items(items, val_fraction=0.2, seed=3)
    assert len(train) + len(val) == 40 and len(val) == 8
    val_images = {it.name.rsplit("_", 1)[0] for it in val}
    assert len(val_images) == 2 and not val_images & {it.name.rsplit("_", 1)[0] for it in train}
    again = split_items(items, val_fraction=0.2, seed=3)
    assert [it.name for it in again[1]] == [it.name for it in val]
    assert [it.name for it in split_items(items, 0.2, seed=4)[1]] != [it.name for it in val]


def test_split_of_plain_names_and_errors():
    items = [_item(f"synthetic_{i:03d}") for i in range(10)]
    train, val = split_items(items, val_fraction=0.3, seed=0)
    assert len(val) == 3 and len(train) == 7
    with pytest.raises(ValueError, match="val_fraction"):
        split_items(items, val_fraction=1.5)
    with pytest.raises(ValueError, match="cannot split"):
        split_items(items[:1], val_fraction=0.5)


def test_train_val_items_on_real_consep(shared_data):
    train, val = train_val_items(str(shared_data / "consep_train"), "hovernet", None, 0.1, 0)
    assert len(train) + len(val) == 432
    assert len(val) % 16 == 0 and len(val) > 0  # whole images of 16 tiles


def test_train_val_items_splits_each_folder(shared_data):
    """CoNSeP tiles and MoNuSeg images together: each folder gives its own share of validation images."""
    folders = [str(shared_data / "consep_train"), str(shared_data / "monuseg_train")]
    train, val = train_val_items(folders, "auto", None, 0.2, 0)
    assert len(train) + len(val) == 432 + 13
    val_monuseg = [it for it in val if it.name.startswith("TCGA")]
    assert len(val_monuseg) == 3 and len(val) - len(val_monuseg) == 16 * round(27 * 0.2)
    assert not {it.name for it in train} & {it.name for it in val}


def test_repeat_by_area_samples_large_images_like_tiles(tmp_path):
    from PIL import Image

    calls = []

    def item(name, size):
        path = tmp_path / f"{name}.png"
        Image.new("RGB", size[::-1]).save(path)

        def load():
            calls.append(name)
            return NucleusRecord(name=name, image=np.zeros((*size, 3), np.uint8), inst_map=np.zeros(size, np.int32))

        return DatasetItem(name=name, source=str(path), loader=load)

    items = repeat_by_area([item("tile", (256, 256)), item("field", (1000, 1000)), item("small", (100, 90))], 256)
    assert [it.name for it in items].count("field") == 15 and len(items) == 17  # 1000² / 256² = 15.3
    field = [it for it in items if it.name == "field"]
    field[0].load(), field[5].load()
    assert calls == ["field"]  # a repeated image is read once
    missing = DatasetItem(name="npy", source="not/an/image[3]", loader=lambda: NucleusRecord(
        name="npy", image=np.zeros((512, 256, 3), np.uint8), inst_map=np.zeros((512, 256), np.int32)))
    assert len(repeat_by_area([missing], 256)) == 2  # size from the record when the header cannot be read


def test_load_pad_crop_collate():
    d = LoadNucleusItemd()({"item": _item("a"), "name": "a"})
    assert d["image"].shape == (3, 40, 50) and d["image"].dtype == np.float32
    assert d["inst"].shape == (1, 40, 50) and d["type"].max() == 0
    padded = PadToMultipled(multiple=16, min_size=64)(d)
    assert padded["image"].shape == (3, 64, 64) and padded["image"][:, 50:, :].min() == 255
    assert padded["inst"][0, 40:].max() == 0
    crops = grid_crop_items([_item("b", (300, 520))], 256)
    assert [c["crop"] for c in crops] == [(0, 0), (0, 256)]  # last partial row/column under 1/4 tile is dropped
    cropped = CropBoxd(patch_size=256)(LoadNucleusItemd()(dict(crops[1])))
    assert cropped["image"].shape == (3, 256, 256)
    batch = ListCollate()([{"image": np.zeros((3, 4, 4), np.float32), "points": np.zeros((n, 2))} for n in (0, 3)])
    assert batch["image"].shape == (2, 3, 4, 4) and [p.shape[0] for p in batch["points"]] == [0, 3]
    assert isinstance(batch["points"][1], torch.Tensor)
