"""The speed levers of inference (issue 17): fewer decoder tokens per prompt (``decoder_tokens``), bfloat16
(``precision``), and the outputs written on a background thread (``run_inference``'s ``write_ahead``).

The tests check what each lever must keep: the decoded part of a window is the centre of the whole window, with the
same prompt coordinates and positional encoding; bfloat16 returns float32 outputs and nearly the same nuclei; the
background writer writes the same files, reports a failed write per file, and finishes what it started when the run
is interrupted.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT
from scripts.inference import InferenceFailures, run_inference
from scripts.pipeline.model_file import load_model
from scripts.pipeline.options import PipelineOptions
from scripts.segmentor.build import build_segmentor
from scripts.segmentor.net import decode_at_points

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from common import random_model_file  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SAMPLE_TILES = sorted((REPO_ROOT / "bundle" / "sample_data" / "images").glob("*.png"))
IMAGE_OUTPUTS = ("_inst.tif", "_type.tif", ".geojson", ".csv", "_overlay.png")


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("value, expected", [("16", 16), (12, 12), ("none", None), (None, None)])
def test_decoder_tokens_parsed(value, expected):
    assert PipelineOptions(decoder_tokens=value).decoder_tokens == expected


@pytest.mark.parametrize("value", ["0", "-3", "sixteen", True])
def test_decoder_tokens_refused_naming_the_option(value):
    with pytest.raises(ValueError, match="decoder_tokens"):
        PipelineOptions(decoder_tokens=value)


@pytest.mark.parametrize("value, expected", [("bfloat16", "bfloat16"), (" BFloat16 ", "bfloat16"),
                                             ("float32", "float32")])
def test_precision_parsed(value, expected):
    assert PipelineOptions(precision=value).precision == expected


@pytest.mark.parametrize("value", ["fp16", "float16", "", 16])
def test_precision_refused_naming_the_option(value):
    with pytest.raises(ValueError, match="precision"):
        PipelineOptions(precision=value)


# ------------------------------------------------------------------------------------------------ decoder tokens
class Recorder(torch.nn.Module):
    """A stand-in segmentor (24-token windows, 4 px tokens) that records what ``decode_windows`` receives."""

    embedding_size = (24, 24)
    patch_size = 4

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def decode_windows(self, windows, coords, labels, pe_offset=0, dtype=None):
        self.calls.append({"windows": windows, "coords": coords, "labels": labels, "pe_offset": pe_offset})
        size = windows.shape[-1] * self.patch_size
        return torch.zeros(len(windows), size, size), torch.zeros(len(windows))


def test_fewer_tokens_decode_the_centre_of_the_whole_window():
    embedding = torch.randn(8, 64, 64)
    # interior prompts (their whole window inside the embedding) with a near and a far negative point
    coords = torch.tensor([[[100.0, 120.0], [110.0, 125.0]], [[131.5, 90.2], [200.0, 90.0]]])
    labels = torch.tensor([[1, 0], [1, 0]])
    recorder = Recorder()
    _, _, whole_offsets = decode_at_points(recorder, embedding, coords, labels)
    _, _, part_offsets = decode_at_points(recorder, embedding, coords, labels, tokens=16)
    whole, part = recorder.calls
    assert whole["pe_offset"] == 0 and part["pe_offset"] == 4
    assert part["windows"].shape[-2:] == (16, 16)
    assert torch.equal(part["windows"], whole["windows"][..., 4:20, 4:20])  # the centre of the whole window
    assert torch.equal(part["coords"] + 16, whole["coords"])  # the same points, 4 tokens of 4 px further in
    assert torch.equal(part["labels"], whole["labels"])  # the far negative is padding in both
    assert part["labels"][1, 1] == -1
    assert torch.equal(part_offsets, whole_offsets + 4 * 4)  # the decoded part starts 4 tokens in


def test_fewer_tokens_at_the_image_border_keep_the_point_in_place():
    embedding = torch.randn(8, 64, 64)
    coords = torch.tensor([[[3.0, 250.0]]])  # left edge, bottom edge
    recorder = Recorder()
    _, _, offsets = decode_at_points(recorder, embedding, coords, torch.tensor([[1]]), tokens=16)
    call = recorder.calls[0]
    assert offsets.tolist() == [[0, 256 - 64]]  # the 16-token part moved inside the embedding
    assert torch.allclose(call["coords"][0, 0], torch.tensor([3.0, 250.0 - 192]))
    assert call["pe_offset"] == 4  # placed in the middle of the whole window's positional encoding


def test_decoder_tokens_beyond_the_window_decode_all_of_it():
    recorder = Recorder()
    points, labels = torch.zeros(1, 1, 2) + 100, torch.ones(1, 1)
    decode_at_points(recorder, torch.randn(8, 64, 64), points, labels, tokens=25)
    assert recorder.calls[0]["windows"].shape[-1] == 24 and recorder.calls[0]["pe_offset"] == 0
    with pytest.raises(ValueError, match="decoder_tokens"):
        decode_at_points(recorder, torch.randn(8, 64, 64), points, labels, tokens=0)


def test_all_tokens_is_the_whole_window():
    torch.manual_seed(0)
    segmentor = build_segmentor("conv_small", 256, patch_size=4, decoder_window=96).eval()
    embedding = torch.randn(segmentor.mask_decoder.transformer_dim, 64, 64)
    coords = torch.tensor([[[100.0, 120.0], [110.0, 125.0]], [[30.0, 200.0], [40.0, 190.0]]])
    labels = torch.tensor([[1, 0], [1, 0]])
    with torch.no_grad():
        whole = decode_at_points(segmentor, embedding, coords, labels)
        same = decode_at_points(segmentor, embedding, coords, labels, tokens=24)
        part = decode_at_points(segmentor, embedding, coords, labels, tokens=16)
    for a, b in zip(whole, same):
        assert torch.equal(a, b)
    assert part[0].shape == (2, 64, 64)
    assert not torch.equal(part[1], whole[1])  # a different (smaller) window: a different decoder input


def test_the_decoder_without_per_prompt_copies_is_sams():
    """``Segmentor.predict_mask`` (each prompt on its own window, positional encoding broadcast) gives SAM's
    ``MaskDecoder.forward`` outputs; in bfloat16 close to them, as float32, and the module is left in float32."""
    torch.manual_seed(0)
    segmentor = build_segmentor("conv_small", 256, patch_size=4, decoder_window=96).eval()
    windows = torch.randn(5, segmentor.mask_decoder.transformer_dim, 16, 16)
    coords, labels = torch.rand(5, 2, 2) * 96, torch.tensor([[1, 0]] * 4 + [[1, -1]])
    with torch.no_grad():
        sparse, dense = segmentor.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        pe = segmentor.prompt_encoder.get_dense_pe()[..., 4:20, 4:20]
        sam_masks, sam_iou = segmentor.mask_decoder(
            image_embeddings=torch.zeros(1, *windows.shape[1:]), image_pe=pe, sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense[..., 4:20, 4:20] + windows, multimask_output=False)
        masks, iou = segmentor.predict_mask(windows, sparse, pe)
        half_masks, half_iou = segmentor.predict_mask(windows, sparse, pe, torch.bfloat16)
    assert masks.shape == sam_masks.shape == (5, 1, 64, 64)
    assert torch.allclose(masks, sam_masks, atol=1e-4) and torch.allclose(iou, sam_iou, atol=1e-5)
    assert half_masks.dtype == half_iou.dtype == torch.float32
    assert float((half_masks - sam_masks).abs().max()) < 0.05 * float(sam_masks.abs().max())
    assert all(p.dtype == torch.float32 for p in segmentor.parameters())


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_precision_follows_the_cpu(monkeypatch, native, expected):
    from scripts.pipeline.promptnucseg import PromptNucSeg

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    prompter = torch.nn.Conv2d(3, 1, 1)
    network = PromptNucSeg(prompter, torch.nn.Linear(1, 1))
    assert network.options.precision == "auto"
    assert network.dtype(prompter) == expected
    assert PromptNucSeg(prompter, torch.nn.Linear(1, 1), precision="float32").dtype(prompter) == torch.float32
    assert PromptNucSeg(prompter, torch.nn.Linear(1, 1), precision="bfloat16").dtype(prompter) == torch.bfloat16


# ------------------------------------------------------------------------------------------------ pipeline
@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """A cheap model: random conv_small segmentor decoding 96 px windows, prompter calibrated on a sample tile."""
    from scripts.data.readers.common import read_image

    image = read_image(SAMPLE_TILES[0])
    path = random_model_file(tmp_path_factory.mktemp("model") / "model.pt", image, prompts_per_tile=20,
                             variant="conv_small", fpn_channels=64, mlp_hidden=64)
    return path


def test_bfloat16_gives_float32_outputs_close_to_float32(model_path):
    """The random prompter sits on its decision boundaries by construction (calibrated), so its outputs are
    compared, not its nuclei; the segmentor is compared on the same prompts."""
    from scripts.data.readers.common import read_image
    from scripts.inference import image_tensor

    image = image_tensor(read_image(SAMPLE_TILES[0]))
    full, half = load_model(model_path, "cpu"), load_model(model_path, "cpu", precision="bfloat16")
    with torch.no_grad():
        a, b = full.run_prompter(image[None]), half.run_prompter(image[None])
    for key in ("pred_points", "pred_logits", "aux_logits"):
        assert b[key].dtype == torch.float32
        scale = float(a[key].abs().max())
        assert float((a[key] - b[key]).abs().max()) < 0.05 * scale, key
    prompts = full.find_prompts(image)
    assert len(prompts["points"]) > 0
    ref, out = full(image, prompts=prompts), half(image, prompts=prompts)
    for key in ("points", "scores", "ious"):
        assert out[key].dtype == torch.float32
    assert abs(len(out["classes"]) - len(ref["classes"])) <= 1
    fg_ref, fg_out = ref["inst_map"].numpy() > 0, out["inst_map"].numpy() > 0
    assert (fg_ref & fg_out).sum() / (fg_ref | fg_out).sum() > 0.9


def test_decoder_tokens_in_the_pipeline_change_only_the_window(model_path):
    from scripts.data.readers.common import read_image
    from scripts.inference import image_tensor

    image = image_tensor(read_image(SAMPLE_TILES[0]))
    full = load_model(model_path, "cpu", decoder_tokens=None)(image)
    same = load_model(model_path, "cpu", decoder_tokens=16)(image)  # this segmentor's whole window: 16 tokens
    assert torch.equal(full["inst_map"], same["inst_map"])
    fewer = load_model(model_path, "cpu", decoder_tokens=10)(image)
    assert not torch.equal(full["inst_map"], fewer["inst_map"])
    more = load_model(model_path, "cpu", decoder_tokens=17)(image)  # more than the window has: all of it
    assert torch.equal(full["inst_map"], more["inst_map"])


def test_weights_kept_in_bfloat16_give_the_outputs_of_autocast_and_follow_new_weights(model_path):
    """``lowered``: a copy whose convolution and linear weights are stored in bfloat16 gives bit for bit the outputs
    of autocast casting the float32 weights on every call; it is made again when the weights change, and float32
    runs the networks themselves."""
    from scripts.data.readers.common import read_image
    from scripts.inference import image_tensor

    image = image_tensor(read_image(SAMPLE_TILES[0]))
    network = load_model(model_path, "cpu", precision="bfloat16")
    kept = network.lowered(network.prompter)
    assert kept is not network.prompter and kept is network.lowered(network.prompter)
    assert kept.fpn.inner_blocks[0][0].weight.dtype == torch.bfloat16 and kept.pixel_mean.dtype == torch.float32
    with torch.no_grad():
        fast = network(image)
        network.lowered = lambda module: module  # autocast casts the float32 weights on every call
        slow = network(image)
        del network.lowered
        assert torch.equal(fast["inst_map"], slow["inst_map"]) and torch.equal(fast["points"], slow["points"])
        network.prompter.class_head.layers[-1].bias.add_(1.0)  # the weights change (a training step, a reload)
    assert network.lowered(network.prompter) is not kept
    assert torch.equal(network.lowered(network.prompter).class_head.layers[-1].bias,
                       network.prompter.class_head.layers[-1].bias.to(torch.bfloat16))
    float32 = load_model(model_path, "cpu", precision="float32")
    assert float32.lowered(float32.prompter) is float32.prompter


# ------------------------------------------------------------------------------------------------ writing
@pytest.fixture()
def folder(tmp_path) -> Path:
    folder = tmp_path / "tiles"
    folder.mkdir()
    for k, tile in enumerate(SAMPLE_TILES[:3]):
        shutil.copy(tile, folder / f"tile{k}.png")
    return folder


def test_background_writes_give_the_same_files(model_path, folder, tmp_path):
    network = load_model(model_path, "cpu", input_scale=1.0)  # one pass per image: the same nuclei each run
    ahead = run_inference(network, str(tmp_path / "ahead"), input_dir=str(folder), write_ahead=1)
    inline = run_inference(network, str(tmp_path / "inline"), input_dir=str(folder), write_ahead=0)
    assert list(ahead.outputs) == list(inline.outputs) == [str(p) for p in sorted(folder.iterdir())]
    assert ahead.nuclei == inline.nuclei
    for path in sorted(folder.iterdir()):
        for suffix in IMAGE_OUTPUTS:
            a = (tmp_path / "ahead" / f"{path.stem}{suffix}").read_bytes()
            b = (tmp_path / "inline" / f"{path.stem}{suffix}").read_bytes()
            assert a == b, f"{path.stem}{suffix} differs"


def test_a_failed_write_is_reported_for_its_file_only(model_path, folder, tmp_path, monkeypatch):
    import scripts.inference as inference

    original = inference.write_overlay

    def failing(path, *args, **kwargs):
        if Path(path).name.startswith("tile1"):
            raise OSError("disk full")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(inference, "write_overlay", failing)
    out = tmp_path / "out"
    with pytest.raises(InferenceFailures) as caught:
        run_inference(load_model(model_path, "cpu"), str(out), input_dir=str(folder))
    assert list(caught.value.failures) == [str(folder / "tile1.png")]
    assert "disk full" in caught.value.failures[str(folder / "tile1.png")]
    for stem in ("tile0", "tile2"):
        assert all((out / f"{stem}{suffix}").is_file() for suffix in IMAGE_OUTPUTS)
    assert not (out / "tile1_overlay.png").exists()


def test_an_interrupt_still_finishes_the_writes_under_way(model_path, folder, tmp_path, monkeypatch):
    import scripts.inference as inference

    network = load_model(model_path, "cpu")
    original_write, original_segment = inference.write_image_outputs, inference.segment_image
    written = []

    def slow_write(stem, *args, **kwargs):
        import time

        time.sleep(0.5)  # still writing when the next image is interrupted
        result = original_write(stem, *args, **kwargs)
        written.append(stem)
        return result

    def interrupted(net, path):
        if path.name == "tile1.png":
            raise KeyboardInterrupt
        return original_segment(net, path)

    monkeypatch.setattr(inference, "write_image_outputs", slow_write)
    monkeypatch.setattr(inference, "segment_image", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_inference(network, str(out), input_dir=str(folder), write_ahead=1)
    assert written == ["tile0"]
    assert all((out / f"tile0{suffix}").is_file() for suffix in IMAGE_OUTPUTS)
    assert not any(out.glob("tile2*"))
