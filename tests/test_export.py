"""The model file: export from training checkpoints in float32 / float16 / int8 storage, read back as float32;
older files still read; a file of another kind is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import BUNDLE_ROOT
from scripts.training.checkpoints import atomic_torch_save
from scripts.pipeline.model_file import INT8_MIN_ELEMENTS, PARTS, export_model, load_model, part_state_dict, read_model_file
from scripts.inference import image_tensor
from scripts.evaluation.metrics import panoptic_quality
from scripts.data.readers.common import read_image

SHIPPED = BUNDLE_ROOT / "models" / "model.pt"
SAMPLE = sorted((BUNDLE_ROOT / "sample_data" / "images").glob("*.png"))[0]


@pytest.fixture(scope="module")
def shipped_checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """The shipped model's two parts written back as training checkpoints (float32)."""
    model = read_model_file(SHIPPED)
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = []
    for part in PARTS:
        path = folder / f"{part}.pt"
        atomic_torch_save({"network": part_state_dict(model, part), "config": model[part]["config"]}, path)
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def exported(shipped_checkpoints, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("exported")
    return {storage: export_model(*shipped_checkpoints, folder / f"{storage}.pt", storage=storage)
            for storage in ("float32", "float16", "int8")}


def test_storages_read_back_as_float32_within_their_precision(exported) -> None:
    reference = read_model_file(exported["float32"])
    sizes = {storage: path.stat().st_size for storage, path in exported.items()}
    assert sizes["float16"] < 0.55 * sizes["float32"] and sizes["int8"] < 0.3 * sizes["float32"]
    for storage in ("float16", "int8"):
        model = read_model_file(exported[storage])
        assert model["storage"] == storage
        n_int8 = 0
        for part in PARTS:
            expected, restored = part_state_dict(reference, part), part_state_dict(model, part)
            assert expected.keys() == restored.keys()
            for key, value in expected.items():
                assert restored[key].dtype == value.dtype, key
                if not value.is_floating_point():
                    assert torch.equal(restored[key], value), key
                    continue
                stored = model[part]["state_dict"][key]
                if stored.dtype == torch.int8:  # error at most half a step of its row's scale
                    n_int8 += 1
                    assert value.dim() >= 2 and value.numel() >= INT8_MIN_ELEMENTS
                    rows = value.reshape(value.shape[0], -1)
                    half_step = rows.abs().amax(1) / 254 + 1e-7
                    error = (restored[key] - value).reshape(rows.shape).abs().amax(1)
                    assert torch.all(error <= half_step * 1.001), key
                else:
                    assert stored.dtype == (torch.float32 if storage == "float32" else torch.float16), key
                    torch.testing.assert_close(restored[key], value, rtol=1e-3, atol=1e-4)
        assert (n_int8 > 0) == (storage == "int8")


@pytest.mark.slow
def test_int8_model_finds_the_same_nuclei_on_a_sample_tile(exported) -> None:
    image = image_tensor(read_image(SAMPLE))
    maps = {}
    for storage in ("float32", "int8"):
        with torch.no_grad():
            maps[storage] = load_model(exported[storage])(image)["inst_map"].numpy()
    assert maps["float32"].max() > 20
    agreement = panoptic_quality(maps["float32"], maps["int8"]).pq
    assert agreement > 0.95


def test_format_1_files_read_and_other_files_are_refused(shipped_checkpoints, tmp_path) -> None:
    old = {"format": "promptnucseg/1"}
    for part, path in zip(PARTS, shipped_checkpoints):
        checkpoint = torch.load(path, weights_only=True)
        old[part] = {"config": checkpoint["config"], "state_dict": checkpoint["network"]}
    atomic_torch_save(old, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt").prompter is not None
    atomic_torch_save({"format": "something/9"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: not a PromptNucSeg model file \(format 'something/9'"):
        read_model_file(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        read_model_file(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="storage must be one of"):
        export_model(*shipped_checkpoints, tmp_path / "x.pt", storage="bfloat16")
