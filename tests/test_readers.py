"""Dataset readers: real MoNuSeg / CoNSeP data, written-out fixtures in every format, conversions and errors."""

import pickle
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import tifffile
from PIL import Image

from scripts.data.readers import dataset_class_names, detect_format, list_items, read_dataset
from scripts.data.readers.common import to_rgb_uint8
from scripts.data.readers.pannuke import CLASS_NAMES as PANNUKE_NAMES
from scripts.data.records import load_class_table
from scripts.data.synthetic import synthetic_dataset, write_synthetic_dataset

FORMATS = ("hovernet", "folder", "pannuke", "monuseg")
FIXTURE = dict(size=(48, 64), n_nuclei=(3, 6), num_classes=3, seed=0)
TABLE_NAMES = {k: v["name"] for k, v in load_class_table().items()}


def same_up_to_relabelling(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two instance maps have the same background and a one-to-one id correspondence."""
    if a.shape != b.shape or not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))


def write_fixture(root: Path, dataset_format: str, n_images: int = 2) -> Path:
    return write_synthetic_dataset(root / dataset_format, n_images, dataset_format=dataset_format, **FIXTURE)


# ---------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def monuseg_read(shared_data):
    """All 13 real MoNuSeg records and the warnings reading them raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = read_dataset(shared_data / "monuseg_train")
    return records, [str(w.message) for w in caught]


@pytest.mark.slow
def test_real_monuseg(shared_data, monuseg_read):
    folder = shared_data / "monuseg_train"
    records, messages = monuseg_read
    assert detect_format(folder) == "monuseg"
    assert dataset_class_names(folder) is None
    assert len(records) == 13
    assert [r.name for r in records] == sorted(p.stem for p in folder.glob("*.tif"))
    for record in records:
        assert record.image.shape == (1000, 1000, 3) and record.image.dtype == np.uint8
        assert record.type_map is None
        assert 200 <= len(np.unique(record.inst_map)) - 1 <= 1000
    # two files hold a 2-vertex region that covers no pixel: reported, not hidden
    assert any(re.search(r"TCGA-50-5931-01Z-00-DX1\.xml: 1 of 445 regions cover no pixel", m) for m in messages)


def test_real_consep(shared_data):
    folder = shared_data / "consep_train"
    assert detect_format(folder) == "hovernet"
    assert dataset_class_names(folder) == {1: "Other", 2: "Inflammatory", 3: "Epithelial", 4: "Spindle-shaped"}
    items = list_items(folder)
    assert len(items) == 432 and [i.name for i in items] == sorted(i.name for i in items)
    classes = set()
    for record in (item.load() for item in items):
        assert record.image.shape == (256, 256, 3) and record.inst_map.shape == (256, 256)
        assert np.all((record.type_map > 0) <= (record.inst_map > 0))
        classes.update(np.unique(record.type_map).tolist())
    assert classes <= {0, 1, 2, 3, 4} and {1, 2, 3, 4} & classes


# ---------------------------------------------------------------- written fixtures: roundtrip and detection


@pytest.mark.parametrize("dataset_format", FORMATS)
def test_roundtrip(tmp_path, dataset_format):
    originals = [record for record, _ in synthetic_dataset(3, **FIXTURE)]
    folder = write_fixture(tmp_path, dataset_format, n_images=3)
    assert detect_format(folder) == dataset_format
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to convert, nothing missing
        records = read_dataset(folder)
    assert len(records) == 3
    for original, record in zip(originals, records):
        assert np.array_equal(record.image, original.image)
        assert same_up_to_relabelling(record.inst_map, original.inst_map)
        if dataset_format == "monuseg":
            assert np.array_equal(record.inst_map, original.inst_map) and record.type_map is None
        else:
            assert np.array_equal(record.type_map, original.type_map)
    if dataset_format == "pannuke":
        assert [r.name for r in records] == ["fold1_000000", "fold1_000001", "fold1_000002"]
        assert all(r.tissue for r in records)
    else:
        assert [r.name for r in records] == [o.name for o in originals]


@pytest.mark.parametrize(
    "dataset_format, expected",
    [
        ("hovernet", TABLE_NAMES),
        ("folder", {k: TABLE_NAMES[k] for k in (1, 2, 3)}),
        ("pannuke", PANNUKE_NAMES),
        ("monuseg", None),
    ],
)
def test_class_names(tmp_path, dataset_format, expected):
    assert dataset_class_names(write_fixture(tmp_path, dataset_format)) == expected


def test_class_names_of_untyped_and_unknown_classes(tmp_path):
    untyped = write_synthetic_dataset(tmp_path / "hv", 1, size=(32, 32), n_nuclei=2, num_classes=0)
    assert dataset_class_names(untyped) is None
    folder = write_fixture(tmp_path, "folder", n_images=1)
    type_path = folder / "labels" / "synthetic_000_type.npy"
    np.save(type_path, np.load(type_path) * 2)  # classes 2, 4, 6
    assert dataset_class_names(folder) == {**TABLE_NAMES, 5: "class 5", 6: "class 6"}


def test_explicit_format_and_bad_format(tmp_path):
    folder = write_fixture(tmp_path, "folder")
    assert len(list_items(folder, "folder")) == 2
    with pytest.raises(ValueError, match="dataset_format"):
        list_items(folder, "coco")


def test_detect_format_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        detect_format(tmp_path / "nowhere")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "stuff"))):
        detect_format(tmp_path / "stuff")


def test_items_are_lazy_and_picklable(tmp_path):
    folder = write_fixture(tmp_path, "folder")
    image_path = folder / "images" / "synthetic_001.png"
    image_path.write_bytes(b"not a png")
    items = list_items(folder)  # lists without reading the images
    restored = pickle.loads(pickle.dumps(items[0]))
    assert restored.load().name == "synthetic_000"
    with pytest.raises(ValueError, match="synthetic_001.png"):
        items[1].load()


def test_hovernet_type_map_from_inst_type(tmp_path):
    folder = write_fixture(tmp_path, "hovernet", n_images=1)
    mat_path = folder / "Labels" / "synthetic_000.mat"
    mat = scipy.io.loadmat(mat_path)
    scipy.io.savemat(mat_path, {"inst_map": mat["inst_map"], "inst_type": mat["inst_type"]})
    assert np.array_equal(read_dataset(folder)[0].type_map, mat["type_map"])
    scipy.io.savemat(mat_path, {"inst_map": mat["inst_map"], "inst_type": mat["inst_type"][:1]})
    with pytest.raises(ValueError, match="synthetic_000.mat"):
        read_dataset(folder)


# ---------------------------------------------------------------- PanNuke layouts


def _write_flat_fold(folder: Path, images: np.ndarray, masks: np.ndarray, tissues: list[str]) -> Path:
    folder.mkdir(parents=True)
    np.save(folder / "images.npy", images)
    np.save(folder / "masks.npy", masks)
    np.save(folder / "types.npy", np.array(tissues))
    return folder


def test_pannuke_flat_fold_uint8_and_ids_unique_across_channels(tmp_path):
    masks = np.zeros((1, 16, 16, 6), dtype=np.float64)
    masks[0, 2:6, 2:6, 0] = 1  # neoplastic nucleus id 1
    masks[0, 8:12, 8:12, 1] = 1  # inflammatory nucleus, also id 1
    masks[0, 8:12, 2:6, 4] = 7  # epithelial
    masks[0, ..., 5] = masks[0, ..., :5].sum(-1) == 0
    images = np.full((1, 16, 16, 3), 200, dtype=np.uint8)
    folder = _write_flat_fold(tmp_path / "Fold 2", images, masks, ["Colon"])
    assert detect_format(folder) == "pannuke"
    (record,) = read_dataset(folder)
    assert record.name == "fold2_000000" and record.tissue == "Colon"
    assert len(np.unique(record.inst_map)) == 4  # background + 3 distinct nuclei
    assert record.type_map[3, 3] == 1 and record.type_map[9, 9] == 2 and record.type_map[9, 3] == 5
    assert record.inst_map[3, 3] != record.inst_map[9, 9]
    assert np.all(record.image == 200)


def test_pannuke_several_official_folds(tmp_path):
    root = write_synthetic_dataset(tmp_path / "pannuke", 2, dataset_format="pannuke", **FIXTURE)
    shutil.copytree(root / "Fold 1", root / "Fold 2")
    for sub in ("images", "masks"):
        (root / "Fold 2" / sub / "fold1").rename(root / "Fold 2" / sub / "fold2")
    items = list_items(root)
    assert [i.name for i in items] == ["fold1_000000", "fold1_000001", "fold2_000000", "fold2_000001"]
    assert items[2].source.endswith("fold2/images.npy[0]") and items[2].tissue
    assert np.array_equal(items[0].load().inst_map, items[2].load().inst_map)


# ---------------------------------------------------------------- image conversions


@pytest.fixture()
def one_image_folder(tmp_path):
    return write_fixture(tmp_path, "folder", n_images=1)


def _replace_image(folder: Path, array: np.ndarray, suffix: str, mode: str | None = None) -> Path:
    (folder / "images" / "synthetic_000.png").unlink()
    path = folder / "images" / f"synthetic_000{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(path, array)
    else:
        Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_rgba_image_converted_with_warning(one_image_folder):
    original = read_dataset(one_image_folder)[0].image
    rgba = np.concatenate([original, np.full(original.shape[:2] + (1,), 128, np.uint8)], axis=2)
    _replace_image(one_image_folder, rgba, ".png")
    with pytest.warns(UserWarning, match=r"synthetic_000\.png: RGBA"):
        assert np.array_equal(read_dataset(one_image_folder)[0].image, original)


def test_gray_image_converted_with_warning(one_image_folder):
    gray = read_dataset(one_image_folder)[0].image[..., 1].copy()
    _replace_image(one_image_folder, gray, ".png")
    with pytest.warns(UserWarning, match=r"synthetic_000\.png: grayscale"):
        image = read_dataset(one_image_folder)[0].image
    assert np.array_equal(image, np.repeat(gray[..., None], 3, axis=2))


def test_uint16_tif_converted_with_warning(one_image_folder):
    original = read_dataset(one_image_folder)[0].image
    _replace_image(one_image_folder, original.astype(np.uint16) * 257, ".tif")
    with pytest.warns(UserWarning, match=r"synthetic_000\.tif: .*16-bit"):
        assert np.array_equal(read_dataset(one_image_folder)[0].image, original)


def test_uint16_gray_png_converted_with_warning(one_image_folder):
    gray16 = read_dataset(one_image_folder)[0].image[..., 0].astype(np.uint16) * 257
    _replace_image(one_image_folder, gray16, ".png")
    with pytest.warns(UserWarning, match=r"synthetic_000\.png: grayscale.*16-bit"):
        image = read_dataset(one_image_folder)[0].image
    assert np.array_equal(image[..., 2], (gray16 // 257).astype(np.uint8))


def test_folder_labels_as_tif_and_png(one_image_folder):
    original = read_dataset(one_image_folder)[0]
    labels = one_image_folder / "labels"
    (labels / "synthetic_000.npy").unlink()
    (labels / "synthetic_000_type.npy").unlink()
    tifffile.imwrite(labels / "synthetic_000.tif", original.inst_map.astype(np.uint16))
    Image.fromarray(original.type_map.astype(np.uint8)).save(labels / "synthetic_000_type.png")
    record = read_dataset(one_image_folder)[0]
    assert np.array_equal(record.inst_map, original.inst_map)
    assert np.array_equal(record.type_map, original.type_map)


def test_hovernet_mat_without_inst_map(tmp_path):
    folder = write_fixture(tmp_path, "hovernet", n_images=1)
    scipy.io.savemat(folder / "Labels" / "synthetic_000.mat", {"type_map": np.zeros((48, 64), np.int32)})
    with pytest.raises(ValueError, match=r"synthetic_000\.mat: no 'inst_map'"):
        read_dataset(folder)


def test_to_rgb_uint8_values_and_layouts():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert to_rgb_uint8(np.full((2, 2, 3), 0.5), "x.npy").max() == 128  # float in [0, 1]: scaled, no warning
        assert to_rgb_uint8(np.full((2, 2, 3), 200.0), "x.npy").max() == 200  # float in [0, 255]: cast
    with pytest.warns(UserWarning, match="channel-first"):
        assert to_rgb_uint8(np.zeros((3, 5, 7), np.uint8), "x.tif").shape == (5, 7, 3)
    with pytest.raises(ValueError, match="odd.tif"):
        to_rgb_uint8(np.zeros((5, 7, 6), np.uint8), "odd.tif")


# ---------------------------------------------------------------- errors name the file


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage, not a real file" * 4)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:120])


def _wrong_mat_size(path: Path) -> None:
    scipy.io.savemat(path, {"inst_map": np.zeros((10, 10), np.int32)})


def _wrong_npy_size(path: Path) -> None:
    np.save(path, np.zeros((10, 10), np.int32))


def _vertex_without_y(path: Path) -> None:
    text = path.read_text()
    start = text.index("<Vertex ")
    path.write_text(text[:start] + '<Vertex X="1.0"/>' + text[text.index("/>", start) + 2 :])


def _far_outside(path: Path) -> None:
    path.write_text(path.read_text().replace('<Vertex X="', '<Vertex X="5', 1))


def _wrong_masks_size(path: Path) -> None:
    np.save(path, np.zeros((2, 10, 10, 6)))


def _short_types(path: Path) -> None:
    np.save(path, np.array(["Colon"]))


ERROR_CASES = [
    # (format, file to break, how, exception, file named in the message)
    ("hovernet", "Images/synthetic_001.png", _garbage, ValueError, "synthetic_001.png"),
    ("hovernet", "Labels/synthetic_001.mat", _garbage, ValueError, "synthetic_001.mat"),
    ("hovernet", "Labels/synthetic_001.mat", Path.unlink, FileNotFoundError, "synthetic_001.mat"),
    ("hovernet", "Labels/synthetic_001.mat", _wrong_mat_size, ValueError, "synthetic_001.mat"),
    ("folder", "images/synthetic_001.png", _truncate, ValueError, "synthetic_001.png"),
    ("folder", "labels/synthetic_001.npy", _garbage, ValueError, "synthetic_001.npy"),
    ("folder", "labels/synthetic_001.npy", Path.unlink, FileNotFoundError, "synthetic_001.png"),
    ("folder", "labels/synthetic_001.npy", _wrong_npy_size, ValueError, "synthetic_001.npy"),
    ("folder", "labels/synthetic_001_type.npy", _wrong_npy_size, ValueError, "synthetic_001_type.npy"),
    ("folder", "labels/synthetic_001_type.npy", Path.unlink, FileNotFoundError, "synthetic_001.png"),
    ("pannuke", "Fold 1/images/fold1/images.npy", _truncate, ValueError, "images.npy"),
    ("pannuke", "Fold 1/masks/fold1/masks.npy", _garbage, ValueError, "masks.npy"),
    ("pannuke", "Fold 1/masks/fold1/masks.npy", Path.unlink, FileNotFoundError, "images.npy"),
    ("pannuke", "Fold 1/masks/fold1/masks.npy", _wrong_masks_size, ValueError, "masks.npy"),
    ("pannuke", "Fold 1/images/fold1/types.npy", _short_types, ValueError, "types.npy"),
    ("monuseg", "synthetic_001.tif", _garbage, ValueError, "synthetic_001.tif"),
    ("monuseg", "synthetic_001.xml", _truncate, ValueError, "synthetic_001.xml"),
    ("monuseg", "synthetic_001.xml", _vertex_without_y, ValueError, "synthetic_001.xml"),
    ("monuseg", "synthetic_001.xml", Path.unlink, FileNotFoundError, "synthetic_001.xml"),
    ("monuseg", "synthetic_001.xml", _far_outside, ValueError, "synthetic_001.xml"),
]


@pytest.mark.parametrize("dataset_format, relative, breaker, error, named", ERROR_CASES)
def test_errors_name_the_file(tmp_path, dataset_format, relative, breaker, error, named):
    folder = write_fixture(tmp_path, dataset_format)
    breaker(folder / relative)
    with pytest.raises(error, match=re.escape(named)):
        read_dataset(folder, dataset_format)


@pytest.mark.parametrize(
    "dataset_format, orphan",
    [("hovernet", "Labels/extra.mat"), ("folder", "labels/extra.npy"), ("monuseg", "sub/extra.xml")],
)
def test_label_without_image_is_an_error(tmp_path, dataset_format, orphan):
    folder = write_fixture(tmp_path, dataset_format)
    (folder / orphan).parent.mkdir(exist_ok=True)
    (folder / orphan).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="extra"):
        list_items(folder)


def test_duplicate_names_are_errors(tmp_path):
    folder = write_fixture(tmp_path, "folder")
    shutil.copy(folder / "images" / "synthetic_000.png", folder / "images" / "synthetic_000.tif")
    with pytest.raises(ValueError, match="synthetic_000"):
        list_items(folder)
    monuseg = write_fixture(tmp_path, "monuseg")
    (monuseg / "copy").mkdir()
    for suffix in (".tif", ".xml"):
        shutil.copy(monuseg / f"synthetic_000{suffix}", monuseg / "copy" / f"synthetic_000{suffix}")
    with pytest.raises(ValueError, match="duplicate item name 'synthetic_000'"):
        list_items(monuseg)


def test_empty_hovernet_folder_is_an_error(tmp_path):
    for sub in ("Images", "Labels"):
        (tmp_path / sub).mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "Images"))):
        list_items(tmp_path)


def test_class_names_of_a_list_of_folders(tmp_path):
    """Typed and untyped folders together: the typed table; typed folders that disagree are an error."""
    hovernet = write_fixture(tmp_path / "a", "hovernet")
    monuseg = write_fixture(tmp_path / "b", "monuseg")
    pannuke = write_fixture(tmp_path / "c", "pannuke")
    assert dataset_class_names([hovernet, monuseg]) == TABLE_NAMES
    assert dataset_class_names([str(monuseg)]) is None
    with pytest.raises(ValueError, match="different class tables"):
        dataset_class_names([hovernet, pannuke])
