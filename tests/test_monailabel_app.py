"""The MONAI Label app (apps/promptnucseg) served by a real ``monailabel start_server`` on loopback.

Both models are called through the REST API on a CoNSeP tile and their answers compared with the pipeline run in
this process on the same image with the same model file: the same nuclei, one valid polygon each, in slide
coordinates, inside the requested region, with class names of the bundle. Malformed requests get a 4xx with a
message and the server keeps serving. The server segments only images of its datastore (or the request's own
upload or session), answers "missing" and "not allowed" alike, writes nothing outside the studies folder and removes
temporary uploads on every path. The trainer fine-tunes from a label submitted the way QuPath submits it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import requests
import shapely
import torch
from PIL import Image
from shapely.geometry import Point, Polygon, box

from conftest import BUNDLE_ROOT, REPO_ROOT

APP_DIR = REPO_ROOT / "apps" / "promptnucseg"
sys.path.insert(0, str(APP_DIR))

from lib.annotations import annotation_from_instances  # noqa: E402
from lib.clicks import segment_clicks  # noqa: E402
from lib.region import Region, resolve_region  # noqa: E402
from lib.labels import label_region, read_asap_outlines, write_folder_dataset  # noqa: E402
from scripts.pipeline.model_file import load_model  # noqa: E402
from scripts.pipeline.options import PipelineOptions  # noqa: E402
from scripts.data.readers.common import read_image  # noqa: E402
from scripts.data.records import load_class_table  # noqa: E402

pytestmark = pytest.mark.slow

TILE = "sample_tile"
SAMPLE_TILE = BUNDLE_ROOT / "sample_data" / "images" / "TCGA-CH-5767-01Z-00-DX1_x300_y600.png"
CLASS_NAMES = {k: v["name"] for k, v in load_class_table().items()}
CLASS_COLORS = {v["name"]: list(v["color"]) for v in load_class_table().values()}
MAX_REGION_AREA = 70000  # > one 256 x 256 tile, < the 512 x 512 mosaic
TIMEOUT = 120


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tile_path(tmp_path_factory) -> Path:
    """A bundle sample tile (256 px, 40x H&E) as the JPEG a studies folder typically holds."""
    path = tmp_path_factory.mktemp("tile") / f"{TILE}.jpg"
    Image.open(SAMPLE_TILE).convert("RGB").save(path, quality=95)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, trained_model_path) -> Path:
    """A copy of the shared trained test model (conftest), a copy because the trainer test overwrites it."""
    path = tmp_path_factory.mktemp("model") / "model.pt"
    shutil.copy(trained_model_path, path)
    return path


@pytest.fixture(scope="module")
def tile(tile_path) -> np.ndarray:
    return read_image(tile_path)


@pytest.fixture(scope="module")
def model(model_file):
    # float32 on both sides (here and the server's ``--conf precision``): under ``precision auto`` (bfloat16 on this
    # CPU) the two processes round differently and outlines move by a pixel; these tests compare exactly
    return load_model(model_file, "cpu", precision="float32")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, studies: Path, model_path: Path, log: Path) -> None:
        self.url, self.studies, self.model_path, self.log = url, studies, model_path, log
        self.root = studies.parent
        self.tmp = self.root / "tmp"  # the server's TMPDIR: where MONAI Label saves uploads
        self.outside = self.root / "outside.png"  # a readable image outside the studies folder

    def infer(self, model: str, params: dict | str | None = None, image: str | None = TILE, **query):
        q = {"image": image, "output": "json", **query} if image else {"output": "json", **query}
        body = params if isinstance(params, str) else json.dumps(params or {})
        return requests.post(f"{self.url}/infer/{model}", params=q, data={"params": body}, timeout=TIMEOUT)

    def log_tail(self) -> str:
        return self.log.read_text()[-4000:] if self.log.is_file() else ""


@pytest.fixture(scope="module")
def server(tmp_path_factory, tile_path, model_file, tile) -> Server:
    """``monailabel start_server`` on 127.0.0.1:<free port> with the app, two studies and the test model."""
    root = tmp_path_factory.mktemp("monailabel")
    studies = root / "studies"
    studies.mkdir()
    shutil.copy(tile_path, studies / f"{TILE}.jpg")
    Image.fromarray(np.tile(tile, (2, 2, 1))).save(studies / "mosaic.png")  # 512 x 512: above max_region_area
    Image.fromarray(tile).save(root / "outside.png")
    (root / "tmp").mkdir()
    port = _free_port()
    log = root / "server.log"
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port), "--conf", "model_path", str(model_file),
           "--conf", "max_region_area", str(MAX_REGION_AREA), "--conf", "train_dir", str(root / "train"),
           "--conf", "device", "cpu", "--conf", "precision", "float32"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
           "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSIONS": "true",
           "MONAI_LABEL_SESSION_PATH": str(root / "sessions"), "TMPDIR": str(root / "tmp")}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    srv = Server(url, studies, model_file, log)
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{srv.log_tail()}")
            try:
                if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"server did not answer /info/ within 90 s:\n{srv.log_tail()}")
            time.sleep(0.5)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------ helpers
def _as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float()


def _expected_annotation(model, image: np.ndarray, location=(0, 0)) -> dict:
    """The pipeline in this process on ``image`` (the region), as the app's annotation."""
    out = model(_as_tensor(image))
    names = {i + 1: n for i, n in enumerate(CLASS_NAMES[k] for k in sorted(CLASS_NAMES))}
    ann = annotation_from_instances(out["inst_map"].numpy(), out["classes"].numpy(), out["scores"].numpy(),
                                    out["ious"].numpy(), location, names, CLASS_COLORS)
    return {**ann, "inst_map": out["inst_map"].numpy()}


def _annotation(response) -> dict:
    assert response.status_code == 200, response.text[:2000]
    body = response.json()
    assert set(body) >= {"name", "model", "location", "size", "annotations", "latencies"}
    assert len(body["annotations"]) == 1
    return body["annotations"][0]["annotation"]


def _check_polygons(annotation: dict, region: tuple[int, int, int, int]) -> list[Polygon]:
    """Strict structure: one ring per element, valid non-empty polygons inside the region, known class names."""
    x, y, w, h = region
    assert annotation["location"] == [x, y] and annotation["size"] == [w, h]
    area = box(x, y, x + w, y + h)
    polygons = []
    for element in annotation["elements"]:
        assert set(element) == {"label", "contours", "id", "score", "iou"}
        assert element["label"] in CLASS_NAMES.values()
        assert annotation["labels"][element["label"]] == load_class_table()[
            {v: k for k, v in CLASS_NAMES.items()}[element["label"]]]["color"]
        assert len(element["contours"]) == 1, "one polygon per nucleus"
        poly = Polygon(element["contours"][0])
        assert poly.is_valid and poly.area > 0
        assert area.covers(poly), f"polygon {element['id']} leaves the region {region}"
        polygons.append(poly)
    assert [e["id"] for e in annotation["elements"]] == list(range(1, len(polygons) + 1))
    return polygons


def _strip(annotation: dict) -> dict:
    return {k: v for k, v in annotation.items() if k != "inst_map"}


# ------------------------------------------------------------------------------------------------ tests
def test_info_lists_models_and_trainer(server):
    info = requests.get(f"{server.url}/info/", timeout=TIMEOUT).json()
    assert set(info["models"]) == {"promptnucseg", "promptnucseg_click"}
    for name, m in info["models"].items():
        assert m["pathology"] is True and m["model_found"] is True
        assert set(m["labels"]) == set(CLASS_NAMES.values())
    assert info["models"]["promptnucseg_click"]["nuclick"] is True  # QuPath's click tool picks it
    assert "nuclick" not in info["models"]["promptnucseg"]
    assert "promptnucseg" in info["trainers"]


def test_automatic_whole_tile_equals_in_process_pipeline(server, model, tile):
    start = time.perf_counter()
    annotation = _annotation(server.infer("promptnucseg"))
    latency = time.perf_counter() - start
    polygons = _check_polygons(annotation, (0, 0, 256, 256))
    expected = _expected_annotation(model, tile)
    assert len(polygons) == expected["inst_map"].max() > 0, "one polygon per nucleus of the pipeline"
    assert annotation == _strip(expected)
    # each polygon outlines (a part of) its own nucleus: it lies within that mask's pixel box and holds some of its
    # pixel centres (pixel (col, row) is the square [col, col + 1] x [row, row + 1] in these coordinates)
    inst = expected["inst_map"]
    for nid, poly in enumerate(polygons, start=1):
        rows, cols = np.nonzero(inst == nid)
        assert box(cols.min(), rows.min(), cols.max() + 1, rows.max() + 1).covers(poly), f"nucleus {nid}"
        assert shapely.intersects_xy(poly, cols + 0.5, rows + 0.5).any(), f"nucleus {nid}: polygon misses its mask"
    print(f"\n256 px tile: {len(polygons)} polygons in {latency:.2f} s (REST, CPU)")


def test_automatic_region_is_in_slide_coordinates(server, model, tile):
    x, y, w, h = 64, 32, 128, 100
    annotation = _annotation(server.infer("promptnucseg", {"location": [x, y], "size": [w, h]}))
    _check_polygons(annotation, (x, y, w, h))
    expected = _expected_annotation(model, tile[y : y + h, x : x + w], location=(x, y))
    assert annotation == _strip(expected)

    # the QuPath request: /infer/wsi/<model>?output=asap with the region in the JSON body -> ASAP XML
    body = {"level": 0, "location": [x, y], "size": [w, h], "tile_size": [1024, 1024], "min_poly_area": 30,
            "params": {"foreground": [], "background": [], "max_workers": 1}}
    response = requests.post(f"{server.url}/infer/wsi/promptnucseg", params={"image": TILE, "output": "asap"},
                             json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text[:2000]
    root = ET.fromstring(response.content)
    xml_polygons = root.findall(".//Annotations/Annotation")
    assert len(xml_polygons) == len(annotation["elements"])
    for node, element in zip(xml_polygons, annotation["elements"]):
        assert node.get("Name") == element["label"] and node.get("Type") == "Polygon"
        coords = [[int(c.get("X")), int(c.get("Y"))] for c in node.iter("Coordinate")]
        assert coords == element["contours"][0]

    # DSA JSON, the default file format, through the same endpoint
    response = requests.post(f"{server.url}/infer/wsi/promptnucseg", params={"image": TILE, "output": "dsa"},
                             json=body, timeout=TIMEOUT)
    assert response.status_code == 200
    assert len(response.json()["elements"]) == len(annotation["elements"])


def test_clicks_segment_clicked_nuclei_and_nothing_far_away(server, model, tile):
    image = _as_tensor(tile)
    with torch.no_grad():
        aux = model.prompter(image[None])["aux_logits"][0, 0].sigmoid().numpy()
    prompts = model.find_prompts(image)["points"].numpy()
    # far from any nucleus: the lowest nuclear probability at least 20 px from every prompt point
    rows, cols = np.mgrid[8:248, 8:248]
    grid = np.stack([cols.ravel(), rows.ravel()], 1)
    far_enough = np.min(np.linalg.norm(grid[:, None] - prompts[None], axis=2), axis=1) > 20
    far = grid[far_enough][np.argmin(aux[grid[far_enough][:, 1], grid[far_enough][:, 0]])]
    assert aux[far[1], far[0]] < 0.5
    # a click on every nucleus the prompter finds (integers, as QuPath sends them) and one far away
    foreground = np.concatenate([np.round(prompts), far[None]]).astype(float)
    background = np.array([[far[0], min(far[1] + 5, 255)]], dtype=float)

    params = {"location": [0, 0], "size": [256, 256], "foreground": foreground.astype(int).tolist(),
              "background": background.astype(int).tolist()}
    response = server.infer("promptnucseg_click", params)
    annotation = _annotation(response)
    polygons = _check_polygons(annotation, (0, 0, 256, 256))
    clicks = response.json()["annotations"][0]["clicks"]
    assert [c["point"] for c in clicks] == foreground.tolist()

    res = segment_clicks(model, image, foreground, background)
    assert [c["status"] for c in clicks] == res.status
    assert clicks[-1]["status"] == "no nucleus" and clicks[-1]["id"] is None  # nothing rather than a blob
    names = {i + 1: n for i, n in enumerate(CLASS_NAMES[k] for k in sorted(CLASS_NAMES))}
    expected = annotation_from_instances(res.inst_map, res.classes, res.scores, res.ious, (0, 0), names,
                                         CLASS_COLORS)
    assert annotation == expected
    accepted = [c for c in clicks if c["status"] == "accepted"]
    assert len(polygons) == len(accepted)
    assert len(accepted) >= len(clicks) // 2
    for click in accepted:  # an accepted click's polygon covers the clicked pixel
        x, y = click["point"]
        assert polygons[click["id"] - 1].covers(Point(x + 0.5, y + 0.5))

    # without a size the region is the clicks' box grown by click_context (128 px), clipped to the image
    annotation = _annotation(server.infer("promptnucseg_click", {"foreground": [[120, 100]]}))
    x, y = annotation["location"]
    w, h = annotation["size"]
    assert (x, y, x + w, y + h) == (0, 0, 249, 229)
    _check_polygons(annotation, (x, y, w, h))


@pytest.mark.parametrize(
    "model, params, image, status, message",
    [
        ("promptnucseg", "{not json", TILE, 400, "not valid JSON"),
        ("promptnucseg", {}, None, 400, "no image"),
        ("promptnucseg", {}, "no_such_image", 404, "image 'no_such_image' is not an image of this server's datastore"),
        ("promptnucseg", "[1, 2, 3]", TILE, 400, "'params' must be a JSON object {...}, got an array: [1, 2, 3]"),
        ("promptnucseg", "null", TILE, 400, "'params' must be a JSON object"),
        ("promptnucseg", '"abc"', TILE, 400, "'params' must be a JSON object"),
        ("promptnucseg", "[" * 100000, TILE, 400, "'params' is not valid JSON"),
        ("promptnucseg", {"size": [10**32, 5]}, TILE, 400, "'size' holds 1000"),
        ("promptnucseg", {"location": [10**32, 5]}, TILE, 400, "'location' holds 1000"),
        ("promptnucseg", {"size": [-5, 5]}, TILE, 400, "'size' must hold non-negative integers"),
        ("promptnucseg", {"location": ["a", 5]}, TILE, 400, "'location' entries must be a number"),
        ("promptnucseg", {"device": "no-such-device"}, TILE, 400, "'device'"),
        ("promptnucseg", {"logging": "loud"}, TILE, 400, "'logging'"),
        ("promptnucseg", {"timeout": "soon"}, TILE, 400, "'timeout'"),
        ("promptnucseg_click", {"foreground": [[10**32, 5]]}, TILE, 400, "'foreground' holds 1000"),
        ("promptnucseg_click", {"foreground": [[5, 5]], "exclude_radius": 10**400}, TILE, 400, "'exclude_radius'"),
        ("no_such_model", {}, TILE, 404, "unknown model"),
        ("promptnucseg", {"location": "abc"}, TILE, 400, "'location'"),
        ("promptnucseg", {"location": [300, 0]}, TILE, 400, "outside the image"),
        ("promptnucseg", {}, "mosaic", 400, "max_region_area"),
        ("promptnucseg", {"location": [0, 0], "size": [100000, 100000]}, "mosaic", 400, "exceeds"),
        ("promptnucseg_click", {}, TILE, 400, "at least one 'foreground' click"),
        ("promptnucseg_click", {"foreground": [[300, 10]]}, TILE, 400, "outside the image"),
        ("promptnucseg_click", {"foreground": [[10, "a"]]}, TILE, 400, "must be a number"),
        ("promptnucseg_click", {"foreground": [[200, 200]], "location": [0, 0], "size": [100, 100]}, TILE, 400,
         "outside the requested region"),
        ("promptnucseg_click", {"foreground": [[20, 20]], "min_click_probability": "high"}, TILE, 400,
         "min_click_probability"),
    ],
)
def test_malformed_requests_get_4xx_with_a_message(server, model, params, image, status, message):
    response = server.infer(model, params, image=image)
    assert response.status_code == status, response.text[:2000]
    assert message in response.json()["detail"]


def test_server_still_serves_after_errors(server, tile):
    response = requests.post(f"{server.url}/infer/wsi/promptnucseg", params={"image": TILE}, json={"location": "abc"},
                             timeout=TIMEOUT)
    assert response.status_code == 422 and "location" in json.dumps(response.json()["detail"])
    assert requests.get(f"{server.url}/info/", timeout=TIMEOUT).status_code == 200
    annotation = _annotation(server.infer("promptnucseg", {"location": [0, 0], "size": [64, 64]}))
    _check_polygons(annotation, (0, 0, 64, 64))
    # QuPath's route for an image the server does not have: the patch uploaded, location/size [0, 0] = all of it
    patch = io.BytesIO()
    Image.fromarray(tile[:64, :80]).save(patch, format="PNG")
    wsi = {"level": 0, "location": [0, 0], "size": [0, 0], "tile_size": [1024, 1024], "min_poly_area": 30}
    response = requests.post(f"{server.url}/infer/wsi_v2/promptnucseg", params={"output": "json"},
                             files={"file": ("patch.png", patch.getvalue(), "image/png")},
                             data={"wsi": json.dumps(wsi)}, timeout=TIMEOUT)
    _check_polygons(_annotation(response), (0, 0, 80, 64))


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _wsi(server: Server, query: dict, body: dict) -> requests.Response:
    return requests.post(f"{server.url}/infer/wsi/promptnucseg", params=query, json=body, timeout=TIMEOUT)


def test_only_datastore_images_are_served_and_refusals_look_alike(server):
    """A path (absolute or relative to the server's folder, existing or not, an image or not) is refused with the
    404 of an unknown id, on every infer route and in every place a request can name its image."""
    images = {
        "absolute path of an image": str(server.outside),
        "relative path of an image": os.path.relpath(server.outside, REPO_ROOT),  # from the server's working dir
        "absolute path of a non-image": "/etc/passwd",
        "relative path of a non-image": "../" * 12 + "etc/passwd",
        "path of a datastore image": str(server.studies / f"{TILE}.jpg"),
        "missing id": "no_such_image",
        "missing path": str(server.root / "nowhere.png"),
    }
    expected = {(404, "image <image> is not an image of this server's datastore")}

    def answers(ask) -> dict[str, tuple[int, str]]:
        out = {}
        for what, image in images.items():
            response = ask(image)
            out[what] = (response.status_code, response.json().get("detail", "").replace(repr(image), "<image>"))
        return out

    region = {"location": [0, 0], "size": [32, 32]}
    assert set(answers(lambda image: server.infer("promptnucseg", region, image=image)).values()) == expected
    in_params = answers(lambda image: server.infer("promptnucseg", {**region, "image": image}))
    assert set(in_params.values()) == expected
    wsi_query = answers(lambda image: _wsi(server, {"image": image, "output": "json"}, region))
    assert set(wsi_query.values()) == expected
    wsi_params = answers(lambda image: _wsi(server, {"image": TILE, "output": "json"},
                                            {**region, "params": {"image": image}}))
    assert set(wsi_params.values()) == expected
    # an uploaded file is segmented; a path in params does not replace it
    upload = {"file": ("patch.png", _png(np.asarray(Image.open(server.outside))[:48, :40]), "image/png")}
    response = requests.post(f"{server.url}/infer/promptnucseg", params={"output": "json"}, files=upload,
                             data={"params": "{}"}, timeout=TIMEOUT)
    _check_polygons(_annotation(response), (0, 0, 40, 48))
    response = requests.post(f"{server.url}/infer/promptnucseg", params={"output": "json"}, files=upload,
                             data={"params": json.dumps({"image": str(server.outside)})}, timeout=TIMEOUT)
    assert response.status_code == 404, response.text
    # batch inference (ids of the datastore, or a list in its params) reads no path either
    response = requests.post(f"{server.url}/batch/infer/promptnucseg", params={"run_sync": "true"}, timeout=TIMEOUT,
                             json={"images": [str(server.outside)], "device": "cpu", "multi_gpu": False,
                                   "max_workers": 1, "save_label": False})
    assert response.status_code == 404 and "is not an image of this server's datastore" in response.text


def test_sessions_are_served(server, tile):
    response = requests.put(f"{server.url}/session/", files={"files": ("patch.png", _png(tile[:40, :56]), "image/png")},
                            timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    session_id = response.json()["session_id"]
    response = requests.post(f"{server.url}/infer/promptnucseg", params={"session_id": session_id, "output": "json"},
                             data={"params": "{}"}, timeout=TIMEOUT)
    _check_polygons(_annotation(response), (0, 0, 56, 40))
    response = requests.post(f"{server.url}/infer/promptnucseg", params={"session_id": "nope", "output": "json"},
                             data={"params": "{}"}, timeout=TIMEOUT)
    assert response.status_code == 404 and "session 'nope' is not a session" in response.json()["detail"]


def test_nothing_is_written_outside_the_studies_folder(server, tile):
    """Image ids and label tags are joined to the studies folder by MONAI Label: '../' in them is refused."""
    before = sorted(p.name for p in server.root.iterdir())
    response = requests.put(f"{server.url}/datastore/image", params={"image": "../escaped_image"}, timeout=TIMEOUT,
                            files={"file": ("patch.png", _png(tile[:32, :32]), "image/png")})
    assert response.status_code == 400 and "'image' must be a plain name" in response.json()["detail"]
    label = '<?xml version="1.0"?><ASAP_Annotations><Annotations /></ASAP_Annotations>'
    response = requests.put(f"{server.url}/datastore/label", params={"image": TILE, "tag": "../../escaped_label"},
                            files={"label": (f"{TILE}.xml", label.encode(), "application/xml")},
                            data={"params": "{}"}, timeout=TIMEOUT)
    assert response.status_code == 400 and "'tag' must be a plain name" in response.json()["detail"]
    response = requests.put(f"{server.url}/datastore/label", params={"image": "/etc/passwd", "tag": "final"},
                            files={"label": (f"{TILE}.xml", label.encode(), "application/xml")},
                            data={"params": "{}"}, timeout=TIMEOUT)
    assert response.status_code == 404 and "is not an image of this server's datastore" in response.json()["detail"]
    response = server.infer("promptnucseg", {"size": [32, 32], "save_label": True, "label_tag": "../../escaped_infer",
                                             "output": "asap"})
    assert response.status_code == 400 and "'label_tag' must be a plain name" in response.json()["detail"]
    response = server.infer("promptnucseg", {"size": [32, 32]}, output="dicom_seg")
    assert response.status_code == 400 and "'output' dicom_seg" in response.json()["detail"]
    assert sorted(p.name for p in server.root.iterdir()) == before
    datastore = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=TIMEOUT).json()
    assert set(datastore["objects"]) == {TILE, "mosaic"}


def _uploads_left(server: Server) -> list[str]:
    return sorted(p.name for p in server.tmp.glob("*.leakcheck.png"))


def test_temporary_uploads_are_removed_on_every_path(server, tile):
    """Success, client error (4xx) and server error (5xx: here the model file is gone) all leave the server's
    temporary folder without the uploaded file (MONAI Label itself removes it only after a success)."""
    upload = {"file": ("patch.leakcheck.png", _png(tile[:64, :64]), "image/png")}

    def post(route: str, form: dict) -> int:
        response = requests.post(f"{server.url}/infer/{route}", params={"output": "json"}, files=upload, data=form,
                                 timeout=TIMEOUT)
        return response.status_code

    assert post("promptnucseg", {"params": json.dumps({"size": [32, 32]})}) == 200
    assert post("promptnucseg", {"params": json.dumps({"location": [300, 0]})}) == 400
    assert post("promptnucseg_click", {"params": json.dumps({"foreground": [[500, 5]]})}) == 400
    assert post("promptnucseg", {"params": json.dumps({"logging": "loud"})}) == 400
    assert post("wsi_v2/promptnucseg", {"wsi": json.dumps({"location": [300, 0], "size": [8, 8]})}) == 400
    moved = server.model_path.with_name("model.away.pt")
    server.model_path.rename(moved)
    try:
        assert post("promptnucseg", {"params": "{}"}) == 503
        assert post("wsi_v2/promptnucseg", {"wsi": json.dumps({"location": [0, 0], "size": [0, 0]})}) == 503
    finally:
        moved.rename(server.model_path)
    deadline = time.time() + 10  # the removal after a success runs after the answer
    while _uploads_left(server) and time.time() < deadline:
        time.sleep(0.2)
    assert _uploads_left(server) == []
    _check_polygons(_annotation(server.infer("promptnucseg", {"size": [32, 32]})), (0, 0, 32, 32))


def test_missing_model_file_is_named(tmp_path):
    from lib.errors import RequestError
    from lib.model import ModelStore

    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(RequestError) as error:
        ModelStore(missing).get("cpu")
    assert error.value.status_code == 503 and str(missing) in error.value.detail


def test_conf_options_reach_the_pipeline(tmp_path):
    """``--conf prompter_tta true`` / ``min_area 5`` become the served pipeline's options; a bad value is named."""
    from lib.configs.promptnucseg import PromptNucSegConfig

    conf = {"model_path": str(tmp_path / "model.pt"), "prompter_tta": "True", "min_area": "5"}
    config = PromptNucSegConfig()
    config.init("promptnucseg", str(tmp_path), conf, None)
    assert config.store.options == PipelineOptions(prompter_tta=True, min_area=5)
    with pytest.raises(ValueError, match="--conf prompter_tta must be true or false"):
        PromptNucSegConfig().init("promptnucseg", str(tmp_path), {**conf, "prompter_tta": "maybe"}, None)


def _qupath_label(inst: np.ndarray, types: np.ndarray) -> str:
    """An ASAP XML label as QuPath's 'Submit Label' writes it (whole image: X = Y = W = H = 0)."""
    from scripts.io.measurements import instance_polygons

    lines = ['<?xml version="1.0"?>', "<ASAP_Annotations>", '  <Annotations Name="" Description="" X="0" Y="0" '
             'W="0" H="0">']
    for nid, poly in instance_polygons(inst, offset_xy=(0.5, 0.5), simplify_tolerance=0).items():
        name = CLASS_NAMES[int(types[inst == nid][0])]
        lines.append(f'    <Annotation Name="{name}" Type="Polygon" PartOfGroup="{name}" Color="#ff0000">')
        lines.append("      <Coordinates>")
        for k, (x, y) in enumerate(list(poly.exterior.coords)[:-1]):
            lines.append(f'        <Coordinate Order="{k}" X="{int(x)}" Y="{int(y)}" />')
        lines += ["      </Coordinates>", "    </Annotation>"]
    lines += ["  </Annotations>", "  <AnnotationGroups />", "</ASAP_Annotations>"]
    return "\n".join(lines)


def _square_labels() -> tuple[np.ndarray, np.ndarray]:
    inst = np.zeros((256, 256), np.int32)
    types = np.zeros_like(inst)
    for k, (r, c) in enumerate([(40, 40), (40, 80), (120, 60), (180, 200), (200, 30)]):
        inst[r : r + 14, c : c + 12] = k + 1
        types[r : r + 14, c : c + 12] = k % 4 + 1
    return inst, types


class _StubPrompter(torch.nn.Module):
    """Fixed prompter outputs on a 64 x 64 image: nuclear map high where x < 32; one predicted point, class 3."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, image):
        aux = torch.full((1, 1, 64, 64), -5.0)
        aux[..., :32] = 5.0
        logits = torch.tensor([[[0.0, 0.0, 4.0, 0.0, 1.0]]])
        return {"pred_points": torch.tensor([[[10.0, 10.0]]]), "pred_logits": logits, "aux_logits": aux}


class _StubModel:
    """What :func:`lib.clicks.segment_clicks` uses of a PromptNucSeg, with a recorded ``segment`` call."""

    options = PipelineOptions(prompter_tile_size=None, tile_overlap=64)

    def __init__(self) -> None:
        self.prompter = _StubPrompter()
        self.negatives = None

    def find_prompts(self, image):
        return {"points": torch.tensor([[12.0, 11.0], [30.0, 30.0]])}  # one on click A, one neighbour

    def segment(self, image, points, extra_negatives=None):
        self.negatives = extra_negatives
        owner = np.zeros((64, 64), np.int32)
        owner[5:16, 5:16] = 1  # click A's nucleus
        owner[58:62, 58:62] = 1  # and a stray part of its mask, dropped: not the part holding the click
        owner[5:16, 45:56] = 2  # click B's
        owner[35:45, 15:25] = 3  # click C's mask, away from C
        return owner, torch.tensor([0, 1, 2]), torch.tensor([0.9, 0.8, 0.7])


def test_click_rule_and_negatives():
    model = _StubModel()
    fg = np.array([[10.0, 10.0], [50.0, 10.0], [10.0, 50.0]])  # A: accepted, B: glass, C: mask elsewhere
    res = segment_clicks(model, torch.zeros(3, 64, 64), fg, np.array([[60.0, 60.0]]))
    assert res.status == ["accepted", "no nucleus", "mask misses click"]
    np.testing.assert_array_equal(res.inst_map, (np.arange(64)[:, None] >= 5) & (np.arange(64)[:, None] < 16)
                                  & (np.arange(64) >= 5) & (np.arange(64) < 16))
    assert res.click_of_id.tolist() == [0] and res.classes.tolist() == [3] and res.ious.tolist() == [pytest.approx(0.9)]
    assert res.probability[0] > 0.99 and res.probability[1] < 0.01
    # the prompter point on click A is the clicked nucleus, not a negative; the far one and the background are
    assert model.negatives.tolist() == [[30.0, 30.0], [60.0, 60.0]]
    assert segment_clicks(model, torch.zeros(3, 64, 64), fg[:1], np.zeros((0, 2)), min_iou=0.95).status == ["low iou"]


def test_region_resolution():
    assert resolve_region({}, 300, 200, 10**6) == Region(0, 0, 300, 200)
    assert resolve_region({"location": [250, 150], "size": [100, 100]}, 300, 200, 10**6) == Region(250, 150, 50, 50)
    clicks = np.array([[10.0, 20.0], [40.0, 30.0]])
    assert resolve_region({}, 300, 200, 10**6, around=clicks, context=16) == Region(0, 4, 57, 43)


def test_qupath_labels_become_the_folder_dataset(tmp_path, tile_path):
    inst, types = _square_labels()
    label = tmp_path / f"{TILE}.xml"
    label.write_text(_qupath_label(inst, types))
    assert [o.name for o in read_asap_outlines(label)] == [CLASS_NAMES[k % 4 + 1] for k in range(5)]
    ids = {n: k for k, n in CLASS_NAMES.items()}
    stems = write_folder_dataset([{"image": str(tile_path), "label": str(label)}], tmp_path / "ds", ids)
    assert stems == [TILE]
    got_inst = np.load(tmp_path / "ds" / "labels" / f"{TILE}.npy")
    got_types = np.load(tmp_path / "ds" / "labels" / f"{TILE}_type.npy")
    np.testing.assert_array_equal(got_inst, inst)  # exact: outlines on pixel corners, centres filled
    np.testing.assert_array_equal(got_types, types)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ds" / "images" / f"{TILE}.png")),
                          read_image(tile_path))
    # a whole slide: only the box around the outlines (+ margin) is cut out
    assert label_region(read_asap_outlines(label), 20000, 20000, 32, 4096**2, "x") == Region(0, 8, 244, 238)
    label.write_text(_qupath_label(inst, types).replace('Name="Other"', 'Name="Tumour"', 1))
    with pytest.raises(ValueError, match="Tumour"):
        write_folder_dataset([{"image": str(tile_path), "label": str(label)}], tmp_path / "ds", ids)


def test_training_from_a_submitted_label_publishes_a_new_model(server):
    """Last (it replaces the served model): submit a label as QuPath does, train 1 epoch, the server reloads."""
    inst, types = _square_labels()
    response = requests.put(f"{server.url}/datastore/label", params={"image": TILE},
                            files={"label": (f"{TILE}.xml", _qupath_label(inst, types).encode(), "application/xml")},
                            data={"params": "{}"}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    before = server.model_path.stat().st_mtime
    response = requests.post(f"{server.url}/train/promptnucseg", json={"max_epochs": 1, "device": "cpu"},
                             timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    deadline = time.time() + 240
    while True:
        task = requests.get(f"{server.url}/train/", timeout=TIMEOUT).json()
        if task.get("status") in ("DONE", "ERROR"):
            break
        assert time.time() < deadline, "training did not finish in time"
        time.sleep(1)
    assert task["status"] == "DONE", "\n".join(task.get("details") or [])
    assert server.model_path.stat().st_mtime > before
    assert server.model_path.with_name("model.prev.pt").is_file()
    info = requests.get(f"{server.url}/info/", timeout=TIMEOUT).json()
    assert info["train_stats"]["promptnucseg"]["images"] == 1
    _check_polygons(_annotation(server.infer("promptnucseg", {"size": [64, 64]})), (0, 0, 64, 64))
