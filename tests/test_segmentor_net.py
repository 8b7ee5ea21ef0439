"""Segmentor network and build: variants, official-checkpoint adaptation to 256 px, batched decoding, freezing,
warm starts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scripts.segmentor.build import SEGMENTOR_VARIANTS, build_segmentor
from scripts.segmentor.net import OUTSIDE_LOGIT, crop_windows, decode_at_points, paste_windows


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_segmentor("vit_tiny", 256).eval()


def _prompts(z: int, p: int = 2, size: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(z, p, 2, generator=g) * (size - 1)
    labels = torch.zeros(z, p, dtype=torch.long)
    labels[:, 0] = 1
    labels[::3, -1] = -1
    return coords, labels


def test_registry_matches_official_dims() -> None:
    assert {"vit_tiny", "vit_b", "vit_l", "vit_h"} <= set(SEGMENTOR_VARIANTS)
    for name, (dim, depth, heads, glob) in {
        "vit_b": (768, 12, 12, (2, 5, 8, 11)),
        "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
        "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
    }.items():
        s = SEGMENTOR_VARIANTS[name]
        assert (s.embed_dim, s.depth, s.num_heads, s.global_attn_indexes, s.window_size, s.prompt_dim) == (
            dim, depth, heads, glob, 14, 256
        )
    t = SEGMENTOR_VARIANTS["vit_tiny"]
    assert (256 // t.patch_size) % t.window_size == 0


def test_shapes_and_token_grid(tiny: torch.nn.Module) -> None:
    images = torch.rand(2, 3, 256, 256) * 255
    coords, labels = _prompts(5)
    with torch.no_grad():
        emb = tiny.encode(images)
        assert emb.shape == (2, 256, 16, 16)
        out = tiny(images, coords[None].repeat(2, 1, 1, 1), labels[None].repeat(2, 1, 1))
        assert out["mask_logits"].shape == (2, 5, 256, 256) and out["iou_pred"].shape == (2, 5)
        assert (out["window_origins"] == 0).all()  # the window is the whole tile
        m, i = tiny.decode(emb[0], coords[:0], labels[:0])
        assert m.shape == (0, 256, 256) and i.shape == (0,)
    fine = build_segmentor("vit_tiny", 256, patch_size=8).eval()
    with torch.no_grad():
        assert fine.encode(images[:1]).shape == (1, 256, 32, 32)
        m, _ = fine.decode(fine.encode(images[:1]), coords, labels)
    assert m.shape == (5, 256, 256)
    assert fine.prompt_encoder.image_embedding_size == (32, 32)


def test_smaller_input_is_padded_and_cropped(tiny: torch.nn.Module) -> None:
    images = torch.rand(1, 3, 200, 240) * 255
    coords, labels = _prompts(3, size=200)
    with torch.no_grad():
        out = tiny(images, coords[None], labels[None])
        masks, _ = tiny.decode(tiny.encode(images), coords, labels, input_size=(200, 240))
    assert out["mask_logits"].shape == (1, 3, 256, 256)  # the window: the padded input
    assert masks.shape == (3, 200, 240)
    torch.testing.assert_close(out["mask_logits"][0, :, :200, :240], masks, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="larger than"):
        tiny.encode(torch.zeros(1, 3, 300, 256))


def test_decoder_batched_equals_per_prompt(tiny: torch.nn.Module) -> None:
    images = torch.rand(1, 3, 256, 256) * 255
    coords, labels = _prompts(7, p=3)
    with torch.no_grad():
        emb = tiny.encode(images)
        masks, ious = tiny.decode(emb, coords, labels)
        for z in range(7):
            m, i = tiny.decode(emb[0], coords[z : z + 1], labels[z : z + 1])
            torch.testing.assert_close(m[0], masks[z], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(i[0], ious[z], atol=1e-5, rtol=1e-5)


def test_forward_matches_encode_decode_and_skips_invalid(tiny: torch.nn.Module) -> None:
    images = torch.rand(2, 3, 256, 256) * 255
    c0, l0 = _prompts(4, seed=1)
    c1, l1 = _prompts(4, seed=2)
    coords, labels = torch.stack([c0, c1]), torch.stack([l0, l1])
    valid = torch.tensor([[True, True, False, True], [False, False, False, False]])
    with torch.no_grad():
        out = tiny(images, coords, labels)
        part = tiny(images, coords, labels, prompt_valid=valid)
        emb = tiny.encode(images[1:])
        m, i = tiny.decode(emb, c1, l1)
    torch.testing.assert_close(out["mask_logits"][1], m, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["iou_pred"][1], i, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part["mask_logits"][valid], out["mask_logits"][valid], atol=1e-4, rtol=1e-4)
    assert (part["mask_logits"][~valid] == 0).all() and (part["iou_pred"][~valid] == 0).all()


def test_freezing_defaults() -> None:
    m = build_segmentor("vit_tiny")
    assert not any(p.requires_grad for p in m.prompt_encoder.parameters())
    assert all(p.requires_grad for p in m.image_encoder.parameters())
    assert all(p.requires_grad for p in m.mask_decoder.parameters())
    m = build_segmentor("vit_tiny", freeze_image_encoder=True, freeze_mask_decoder=True, freeze_prompt_encoder=False)
    assert all(p.requires_grad for p in m.prompt_encoder.parameters())
    assert not any(p.requires_grad for p in m.image_encoder.parameters())
    assert not any(p.requires_grad for p in m.mask_decoder.parameters())


def test_bad_arguments() -> None:
    with pytest.raises(KeyError, match="vit_x"):
        build_segmentor("vit_x")
    with pytest.raises(TypeError, match="embed_dims"):
        build_segmentor("vit_tiny", embed_dims=8)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_segmentor("vit_tiny", 250)


def test_missing_checkpoint_names_file(tmp_path) -> None:
    missing = tmp_path / "sam_vit_b_nothere.pth"
    with pytest.raises(FileNotFoundError, match="sam_vit_b_nothere.pth"):
        build_segmentor("vit_b", checkpoint=missing)


def test_resize_from_larger_input_and_key_errors(tmp_path) -> None:
    """A 512 px state dict (32x32 tokens) loads into a 256 px model; unfit keys are listed."""
    torch.manual_seed(0)
    big = build_segmentor("vit_tiny", 512)
    with torch.no_grad():
        for name, p in big.named_parameters():
            if "rel_pos" in name:
                p.normal_()
    sd = {k: v.clone() for k, v in big.state_dict().items()}
    path = tmp_path / "big.pth"
    torch.save(sd, path)
    small = build_segmentor("vit_tiny", 256, checkpoint=path)
    enc = small.image_encoder
    assert enc.pos_embed.shape == (1, 16, 16, 192)
    want = F.interpolate(sd["image_encoder.pos_embed"].permute(0, 3, 1, 2), (16, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(enc.pos_embed.detach(), want.permute(0, 2, 3, 1))
    g = sd["image_encoder.blocks.1.attn.rel_pos_h"]  # global block: 63 -> 31
    assert enc.blocks[1].attn.rel_pos_h.shape == (31, 64)
    torch.testing.assert_close(enc.blocks[1].attn.rel_pos_h.detach(), F.interpolate(g.T[None], 31, mode="linear")[0].T)
    torch.testing.assert_close(enc.blocks[0].attn.rel_pos_w.detach(), sd["image_encoder.blocks.0.attn.rel_pos_w"])

    broken = dict(sd)
    broken.pop("mask_decoder.iou_token.weight")
    broken["image_encoder.extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError) as err:
        build_segmentor("vit_tiny", 256, checkpoint=tmp_path / "broken.pth")
    assert "mask_decoder.iou_token.weight" in str(err.value) and "image_encoder.extra.weight" in str(err.value)
    with pytest.raises(ValueError, match="patch_embed.proj.weight"):
        build_segmentor("vit_tiny", 256, checkpoint=path, patch_size=8)


@pytest.fixture(scope="module")
def official_vit_b(tmp_path_factory) -> tuple:
    """An official-layout SAM ViT-B state dict (random init, position tables filled) saved once per module."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if "pos" in name:
                p.normal_()
    sd = sam.state_dict()
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth"
    torch.save(sd, path)
    keep = {k: sd[k].clone() for k in ("image_encoder.pos_embed", "image_encoder.blocks.2.attn.rel_pos_h",
                                        "image_encoder.blocks.0.attn.rel_pos_h", "mask_decoder.iou_token.weight",
                                        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix")}
    del sam, sd
    return path, keep


@pytest.mark.slow
def test_load_official_vit_b_into_256(official_vit_b) -> None:
    path, sd = official_vit_b
    model = build_segmentor("vit_b", 256, checkpoint=path).eval()
    enc = model.image_encoder
    assert enc.pos_embed.shape == (1, 16, 16, 768)
    want = F.interpolate(sd["image_encoder.pos_embed"].permute(0, 3, 1, 2), (16, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(enc.pos_embed.detach(), want.permute(0, 2, 3, 1))
    original = sd["image_encoder.blocks.2.attn.rel_pos_h"]  # global attention: 127 -> 31
    assert original.shape == (127, 64) and enc.blocks[2].attn.rel_pos_h.shape == (31, 64)
    torch.testing.assert_close(
        enc.blocks[2].attn.rel_pos_h.detach(), F.interpolate(original.T[None], 31, mode="linear", align_corners=False)[0].T
    )
    torch.testing.assert_close(enc.blocks[0].attn.rel_pos_h.detach(), sd["image_encoder.blocks.0.attn.rel_pos_h"])  # window 14
    torch.testing.assert_close(model.mask_decoder.iou_token.weight.detach(), sd["mask_decoder.iou_token.weight"])
    torch.testing.assert_close(
        model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix,
        sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"],
    )
    assert model.prompt_encoder.image_embedding_size == (16, 16)
    assert model.prompt_encoder.input_image_size == (256, 256)
    assert not any(p.requires_grad for p in model.prompt_encoder.parameters())
    coords, labels = _prompts(3)
    with torch.no_grad():
        m, i = model.decode(model.encode(torch.rand(1, 3, 256, 256) * 255), coords, labels)
    assert m.shape == (3, 256, 256) and torch.isfinite(m).all() and i.shape == (3,)
    wide = build_segmentor("vit_b", 256, checkpoint=path, window_size=16)  # window tables 27 -> 31 as well
    torch.testing.assert_close(
        wide.image_encoder.blocks[0].attn.rel_pos_h.detach(),
        F.interpolate(sd["image_encoder.blocks.0.attn.rel_pos_h"].T[None], 31, mode="linear")[0].T,
    )


def _disk_image(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 256 px H&E-like tile with dark disk nuclei on pink; (image (H, W, 3) uint8, inst (H, W) int32)."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[:256, :256]
    inst = np.zeros((256, 256), np.int32)
    centers = [(r, c) for r in range(28, 256, 50) for c in range(28, 256, 50)]
    for i, (r, c) in enumerate(centers, 1):
        rad = rng.uniform(7, 12)
        inst[(yy - r - rng.randint(-6, 7)) ** 2 + (xx - c - rng.randint(-6, 7)) ** 2 <= rad**2] = i
    image = np.empty((256, 256, 3), np.float32)
    image[:] = (235, 190, 210)
    image[inst > 0] = (90, 40, 130)
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), inst


@pytest.mark.slow
def test_tiny_overfits_one_image() -> None:
    """30 steps on one disk image: the loss falls, and the class-balanced pixel term drops well below ln 2 = 0.693,
    the best any prediction that does not tell nucleus from background pixels can reach (so not a collapse)."""
    from scripts.segmentor.prompts import SampleNucleusPromptsd
    from scripts.segmentor.loss import SegmentorLoss

    torch.manual_seed(0)
    image, inst = _disk_image()
    sampler = SampleNucleusPromptsd("inst", num_prompts=8, num_neg=1)
    sampler.set_random_state(0)
    model = build_segmentor("vit_tiny", 256).train()
    loss_fn = SegmentorLoss(mask_loss="bce", mask_reduction="balanced", focal_weight=1.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    img = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    losses, mask_terms = [], []
    for _ in range(30):
        s = sampler({"inst": inst[None]})
        out = model(img, s["prompt_coords"][None], s["prompt_labels"][None])
        terms = loss_fn(out["mask_logits"], out["iou_pred"], s["prompt_masks"][None], s["prompt_valid"][None])
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(terms["loss"].item())
        mask_terms.append(terms["mask"].item())
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert np.isfinite(losses).all() and last < 0.85 * first, (first, last)
    assert np.mean(mask_terms[-5:]) < 0.45, mask_terms


def test_batch_without_any_nucleus_still_back_propagates() -> None:
    """Random crops can hold no nucleus: every prompt is padding, yet the training step must not fail."""
    from scripts.segmentor.loss import SegmentorLoss

    net = build_segmentor("conv_small", image_size=64)
    valid = torch.zeros(2, 3, dtype=torch.bool)
    out = net(torch.rand(2, 3, 64, 64) * 255, torch.zeros(2, 3, 2, 2), -torch.ones(2, 3, 2, dtype=torch.long), valid)
    loss = SegmentorLoss(mask_loss="bce", mask_reduction="balanced")(
        out["mask_logits"], out["iou_pred"], torch.zeros(2, 3, 64, 64), valid)["loss"]
    loss.backward()
    assert float(loss) == 0.0


def test_decode_windows_equals_decode_on_a_shared_embedding_and_encode_whole():
    """Each prompt on its own window: with the same window for all, exactly :meth:`Segmentor.decode`; a CNN
    encoder runs on larger images in one pass, a ViT refuses."""
    torch.manual_seed(0)
    conv = build_segmentor("conv_small", image_size=128, prompt_dim=64, decoder_mlp_dim=128, decoder_heads=2).eval()
    image = torch.rand(1, 3, 128, 128) * 255
    coords, labels = torch.rand(5, 2, 2) * 127, torch.tensor([[1, 0]] * 5)
    with torch.no_grad():
        embedding = conv.encode(image)
        masks, ious = conv.decode(embedding, coords, labels)
        w_masks, w_ious = conv.decode_windows(embedding.expand(5, -1, -1, -1), coords, labels)
        torch.testing.assert_close(w_masks, masks)
        torch.testing.assert_close(w_ious, ious)
        torch.testing.assert_close(conv.encode_whole(image), embedding)
        assert conv.encode_whole(torch.rand(1, 3, 256, 192) * 255).shape == (1, 64, 16, 12)
        other = conv.decode_windows(torch.cat([embedding, embedding.flip(-1)]).expand(2, -1, -1, -1)[[1]], coords[:1],
                                    labels[:1])
        assert not torch.allclose(other[0], masks[:1])  # the window does matter
    with pytest.raises(ValueError, match="convolutional"):
        build_segmentor("vit_tiny", image_size=64).encode_whole(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="windows must be"):  # more tokens than the decoding window's 8
        conv.decode_windows(torch.rand(2, 64, 9, 9), coords[:2], labels[:2])


def test_decoder_window_decodes_each_prompt_on_its_centred_window():
    """8 px tokens, 128 px decoding window on a 256 px tile: the decoder sees 16x16 tokens centred on each positive
    point (moved inside the tile at its borders); ``decode`` pastes the windows into the tile; the training forward
    gives the windows and their origins; negatives outside a window become padding."""
    torch.manual_seed(0)
    net = build_segmentor("conv_small", image_size=256, patch_size=8, decoder_window=128, prompt_dim=64,
                          decoder_mlp_dim=128, decoder_heads=2).eval()
    assert (net.patch_size, net.window_size, net.embedding_size) == (8, 128, (16, 16))
    image = torch.rand(1, 3, 256, 256) * 255
    coords = torch.tensor([[[130.0, 100.0], [150.0, 110.0]], [[5.0, 250.0], [240.0, 5.0]]])  # (Z, P, 2) (x, y)
    labels = torch.tensor([[1, 0], [1, 0]])
    with torch.no_grad():
        embedding = net.encode(image)[0]
        assert embedding.shape == (64, 32, 32)
        logits, ious, origins = decode_at_points(net, embedding, coords, labels)
        assert logits.shape == (2, 128, 128)
        # point (130, 100) is in token (16, 12): window from token (8, 4) = px (64, 32); (5, 250): clamped (0, 128)
        assert origins.tolist() == [[64, 32], [0, 128]]
        window = embedding[:, 4:20, 8:24][None]
        expected, _ = net.decode_windows(window, coords[:1] - torch.tensor([64.0, 32.0]), labels[:1])
        torch.testing.assert_close(logits[:1], expected)
        # the second prompt's negative (240, 5) is outside its window: it becomes padding (label -1)
        alone, _ = net.decode_windows(embedding[:, 16:32, 0:16][None], coords[1:] - torch.tensor([0.0, 128.0]),
                                      torch.tensor([[1, -1]]))
        torch.testing.assert_close(logits[1:], alone)
        pasted, _ = net.decode(embedding, coords, labels)
        assert pasted.shape == (2, 256, 256)
        torch.testing.assert_close(pasted[0, 32:160, 64:192], logits[0])
        assert (pasted[0, :32] == OUTSIDE_LOGIT).all() and (pasted[1, :128] == OUTSIDE_LOGIT).all()
        out = net(image, coords[None], labels[None])
    assert out["mask_logits"].shape == (1, 2, 128, 128)
    assert out["window_origins"][0].tolist() == origins.tolist()
    torch.testing.assert_close(out["mask_logits"][0], logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="decoder_window"):
        build_segmentor("conv_small", image_size=256, patch_size=8, decoder_window=100)
    fine = build_segmentor("conv_small", image_size=128, patch_size=4, decoder_window=64, prompt_dim=32,
                           decoder_mlp_dim=64, decoder_heads=2)
    assert fine.encode(torch.rand(1, 3, 128, 128)).shape == (1, 32, 32, 32) and fine.embedding_size == (16, 16)
    with pytest.raises(ValueError, match="stride must be"):
        build_segmentor("conv_small", image_size=128, patch_size=32)


def test_crop_and_paste_windows_are_inverse_inside_the_image():
    images = torch.arange(2 * 6 * 7, dtype=torch.float32).view(2, 6, 7)
    origins = torch.tensor([[1, 2], [4, 3]])  # (x, y) px
    crops = crop_windows(images, origins, 4)
    assert crops.shape == (2, 4, 4)
    torch.testing.assert_close(crops[0], images[0, 2:6, 1:5])
    torch.testing.assert_close(crops[1, :3, :3], images[1, 3:6, 4:7])
    assert (crops[1, 3:] == 0).all() and (crops[1, :, 3:] == 0).all()  # beyond the image: 0
    pasted = paste_windows(crops, origins, (6, 7))
    torch.testing.assert_close(pasted[0, 2:6, 1:5], images[0, 2:6, 1:5])
    assert (pasted[0, :2] == OUTSIDE_LOGIT).all()


def test_warm_start_copies_what_fits(tmp_path):
    """A stride-8 segmentor starts from a stride-16 checkpoint: the decoder, prompt encoder, backbone and neck carry
    over; the finer stages' projections (other kernel sizes) keep their fresh weights."""
    from scripts.training.checkpoints import warm_start

    torch.manual_seed(0)
    small = dict(prompt_dim=64, decoder_mlp_dim=128, decoder_heads=2)
    coarse = build_segmentor("conv_small", image_size=128, **small)
    path = tmp_path / "best.pt"
    torch.save({"network": coarse.state_dict(), "epoch": 1}, path)  # the layout of a training's best.pt
    fine = build_segmentor("conv_small", image_size=128, patch_size=8, decoder_window=64, **small)
    fresh_proj = fine.image_encoder.proj[0].weight.clone()
    assert warm_start(fine, None) is fine
    warm_start(fine, path)
    torch.testing.assert_close(fine.mask_decoder.state_dict()["iou_token.weight"], coarse.mask_decoder.iou_token.weight)
    torch.testing.assert_close(fine.image_encoder.neck[0].weight, coarse.image_encoder.neck[0].weight)
    torch.testing.assert_close(fine.image_encoder.proj[0].weight, fresh_proj)  # kernel 2 vs 4: not copied
    with pytest.raises(FileNotFoundError, match="init_checkpoint"):
        warm_start(fine, tmp_path / "missing.pt")
    torch.save({"state_dict": {"unrelated.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no parameter matches"):
        warm_start(fine, tmp_path / "other.pt")
