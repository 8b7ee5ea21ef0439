"""Prompter network: shapes, anchors, pretrained-file handling and pixel alignment of sampling / aux map."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scripts.backbones import SmallResNet, TorchvisionResNet
from scripts.prompter.net import IMAGENET_MEAN, Prompter, make_anchors, resample_to_pixels, sample_at_points


pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = dict(backbone="resnet_small", fpn_channels=32, mlp_hidden=32)


def small_prompter(**kwargs) -> Prompter:
    torch.manual_seed(0)
    return Prompter(**{"num_classes": 5, **SMALL, **kwargs}).eval()


@pytest.mark.parametrize("size", [(256, 256), (250, 300), (37, 61)])
def test_forward_shapes(size):
    height, width = size
    net = small_prompter()
    with torch.no_grad():
        out = net(torch.rand(2, 3, height, width) * 255)
    num_anchors = math.ceil(height / 8) * math.ceil(width / 8)
    assert out["pred_points"].shape == (2, num_anchors, 2)
    assert out["coarse_points"].shape == (2, num_anchors, 2)
    assert out["pred_logits"].shape == (2, num_anchors, 6)
    assert out["aux_logits"].shape == (2, 1, height, width)
    assert out["anchors"].shape == (num_anchors, 2)


def test_anchor_grid_and_zero_initial_offsets():
    anchors = make_anchors(20, 30, 8)  # 3 x 4 grid
    assert anchors.shape == (12, 2)
    assert anchors[0].tolist() == [4.0, 4.0]
    assert anchors[1].tolist() == [12.0, 4.0]  # row-major: x varies fastest
    assert anchors[4].tolist() == [4.0, 12.0]
    assert anchors[-1].tolist() == [28.0, 20.0]
    net = small_prompter(levels=(2, 3, 4, 5), anchor_step=16)
    with torch.no_grad():
        out = net(torch.rand(1, 3, 64, 80) * 255)
    torch.testing.assert_close(out["pred_points"][0], out["anchors"])  # offset heads start at zero


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="backbone"):
        Prompter(1, backbone="nope")
    with pytest.raises(ValueError, match="levels"):
        Prompter(1, levels=(3, 4))
    missing = tmp_path / "absent.pth"
    for backbone in ("resnet_small", "resnet18"):
        with pytest.raises(FileNotFoundError, match="absent.pth"):
            Prompter(1, backbone=backbone, pretrained=str(missing))


def test_pretrained_roundtrip_and_mismatch(tmp_path):
    source = SmallResNet()
    path = tmp_path / "small.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    net = Prompter(1, pretrained=path, **SMALL)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(net.backbone.state_dict()[key], value)

    import torchvision

    resnet = torchvision.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), path)  # fc.* keys are ignored
    loaded = TorchvisionResNet("resnet18", path)
    torch.testing.assert_close(loaded.body.conv1.weight, resnet.conv1.weight)

    broken = dict(resnet.state_dict())
    broken.pop("layer1.0.conv1.weight")
    torch.save(broken, path)
    with pytest.raises(ValueError, match="layer1.0.conv1.weight"):
        TorchvisionResNet("resnet18", path)


def test_timm_convnext_pretrained(tmp_path):
    timm = pytest.importorskip("timm")
    from scripts.backbones import TimmConvNeXt

    with pytest.raises(FileNotFoundError, match="absent.pth"):
        TimmConvNeXt("convnext_atto", tmp_path / "absent.pth")
    full = timm.create_model("convnext_atto", pretrained=False)
    path = tmp_path / "atto.pth"
    torch.save(full.state_dict(), path)
    net = TimmConvNeXt("convnext_atto", path)
    assert net.out_channels == (40, 80, 160, 320)
    torch.testing.assert_close(net.body.stages_3.blocks[1].mlp.fc2.weight, full.stages[3].blocks[1].mlp.fc2.weight)
    broken = full.state_dict()
    broken.pop("stages.0.blocks.0.conv_dw.weight")
    torch.save(broken, path)
    with pytest.raises(ValueError, match="conv_dw"):
        TimmConvNeXt("convnext_atto", path)


# ---------------------------------------------------------------- alignment


@pytest.mark.parametrize("stride,offset", [(4, 1.5), (8, 3.5), (4, 0.0), (16, 0.0)])
def test_sample_at_points_reproduces_cell_centres(stride, offset):
    """A map whose cells hold their own centre (x, y) in px returns the sampled point itself (bilinear is exact
    on linear functions), for any point between the first and last cell centres."""
    h, w = 5, 7
    ys = torch.arange(h, dtype=torch.float32) * stride + offset
    xs = torch.arange(w, dtype=torch.float32) * stride + offset
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    feature = torch.stack([gx, gy]).unsqueeze(0)  # (1, 2, h, w)
    points = torch.rand(1, 50, 2) * torch.tensor([(w - 1) * stride, (h - 1) * stride]) + offset
    torch.testing.assert_close(sample_at_points(feature, points, stride, offset), points)


def test_resample_to_pixels_matches_interpolate_and_impulse_position():
    feature = torch.randn(2, 3, 6, 9)
    ours = resample_to_pixels(feature, 4, 1.5, (22, 35))
    reference = F.interpolate(feature, scale_factor=4, mode="bilinear", align_corners=False)[..., :22, :35]
    torch.testing.assert_close(ours, reference)

    impulse = torch.zeros(1, 1, 6, 9)
    impulse[0, 0, 2, 3] = 1.0
    centred = resample_to_pixels(impulse, 4, 0.0, (24, 36))[0, 0]  # cell (2, 3) centred on pixel (row 8, col 12)
    assert centred[8, 12] == 1.0 and (centred < 1).sum() == centred.numel() - 1
    corner = resample_to_pixels(impulse, 4, 1.5, (24, 36))[0, 0]  # centred on (9.5, 13.5): peak on 9..10 x 13..14
    assert torch.allclose(corner[9:11, 13:15], torch.full((2, 2), 0.875**2))
    assert corner.max() == corner[9:11, 13:15].max()


def _receptive_field_centre(backbone: nn.Module, stage: int, size: int, cell: int, positive: bool) -> tuple[float, float, bool]:
    """(row, col) centre of the input support of one feature cell, and whether the support touches the border."""
    backbone.eval()
    if positive:  # all-positive weights: ReLUs never cut the gradient, the support is the exact receptive field
        with torch.no_grad():
            for m in backbone.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.fill_(1.0 / m.weight[0].numel())
                    if m.bias is not None:
                        m.bias.zero_()
    for name, m in list(backbone.named_modules()):  # max-pooling passes gradient to one input only: use its
        if isinstance(m, nn.MaxPool2d):  # average-pooling twin, which has the same geometry
            parent = backbone.get_submodule(name.rpartition(".")[0]) if "." in name else backbone
            setattr(parent, name.rpartition(".")[2], nn.AvgPool2d(m.kernel_size, m.stride, m.padding))
    x = (torch.ones if positive else torch.randn)(1, 3, size, size, requires_grad=True)
    backbone(x)[stage][0, :, cell, cell].sum().backward()
    support = (x.grad.abs().sum((0, 1)) > 0).nonzero()
    lo, hi = support.min(0).values, support.max(0).values
    centre = ((lo + hi).float() / 2).tolist()
    return centre[0], centre[1], bool((lo == 0).any() or (hi == size - 1).any())


@pytest.mark.parametrize(
    "name,stage,size",
    [("resnet_small", 0, 64), ("resnet_small", 1, 96), ("resnet_small", 2, 256), ("resnet18", 0, 64), ("resnet18", 1, 128)],
)
def test_backbone_cell_offsets_match_receptive_fields(name, stage, size):
    torch.manual_seed(0)
    backbone = SmallResNet() if name == "resnet_small" else TorchvisionResNet(name)
    stride = 4 * 2**stage
    cell = size // stride // 2
    row, col, touches = _receptive_field_centre(backbone, stage, size, cell, positive=True)
    assert not touches
    expected = stride * cell + backbone.cell_offsets[stage]
    assert row == col == expected


def test_convnext_cell_offsets_match_receptive_fields():
    pytest.importorskip("timm")
    from scripts.backbones import TimmConvNeXt

    torch.manual_seed(0)
    backbone = TimmConvNeXt("convnext_atto")
    for stage, size in ((0, 96), (1, 224)):
        stride = 4 * 2**stage
        cell = size // stride // 2
        row, col, touches = _receptive_field_centre(backbone, stage, size, cell, positive=False)
        assert not touches
        assert row == col == stride * cell + backbone.cell_offsets[stage]


def _bias_free(net: Prompter) -> Prompter:
    """Zero every conv bias: an all-mean-colour region then has exactly zero features, like the zero padding."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.zero_()
    return net


def _canvas(height: int, width: int) -> torch.Tensor:
    return torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).expand(1, 3, height, width).clone()


def test_padding_is_right_bottom_and_output_cropped_top_left():
    """A 250 x 300 image gives the same outputs as the same image on a 256 x 320 mean-colour canvas (top-left),
    except the anchors of the last anchor row/column, whose 3x3 grid-conv neighbourhood differs."""
    net = _bias_free(small_prompter())
    torch.manual_seed(1)
    image = torch.rand(1, 3, 250, 300) * 255
    canvas = _canvas(256, 320)
    canvas[..., :250, :300] = image
    with torch.no_grad():
        small, big = net(image), net(canvas)
    torch.testing.assert_close(small["aux_logits"], big["aux_logits"][..., :250, :300])
    small_logits = small["pred_logits"].reshape(32, 38, -1)  # ceil(250 / 8) x ceil(300 / 8) anchors
    big_logits = big["pred_logits"].reshape(32, 40, -1)
    torch.testing.assert_close(small_logits[:31, :37], big_logits[:31, :37])


def test_shift_equivariance_of_aux_map_and_anchor_outputs():
    """Content moved by (dy, dx) = (32, 64) px (multiples of the largest stride) moves every output by as much.

    Bias-free, so mean-colour areas have zero features; the content stays farther than the receptive field
    from every border, so zero padding and mean-colour canvas are indistinguishable: the outputs must agree exactly.
    """
    net = _bias_free(small_prompter())
    torch.manual_seed(2)
    content = torch.rand(1, 3, 32, 32) * 255
    size, margin, (dy, dx) = 608, 256, (32, 64)
    first, second = _canvas(size, size), _canvas(size, size)
    first[..., margin : margin + 32, margin : margin + 32] = content
    second[..., margin + dy : margin + dy + 32, margin + dx : margin + dx + 32] = content
    with torch.no_grad():
        a, b = net(first), net(second)
    aux_a, aux_b = a["aux_logits"][0, 0], b["aux_logits"][0, 0]
    assert (aux_a - aux_a[0, 0]).abs().max() > 1e-2  # the content shows in the map
    torch.testing.assert_close(aux_a[: size - dy, : size - dx], aux_b[dy:, dx:], atol=1e-5, rtol=1e-4)
    cells = size // 8
    grid_a, grid_b = a["pred_logits"].reshape(cells, cells, -1), b["pred_logits"].reshape(cells, cells, -1)
    torch.testing.assert_close(grid_a[: cells - dy // 8, : cells - dx // 8], grid_b[dy // 8 :, dx // 8 :], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("size", [(64, 64), (50, 77)])
def test_region_logits_at_points_are_the_map_values_there(size):
    """Inference evaluates the nuclear-region head on the P2 cells its points read only: the same logits as the whole
    map at the pixel nearest each point, points on the image borders and outside it included."""
    from scripts.prompter.decode import decode_prompts, sample_mask_probability

    height, width = size
    net = small_prompter()
    image = torch.rand(1, 3, height, width) * 255
    with torch.no_grad():
        full = net(image)
        lean = net(image, region_map=False)
        assert "aux_logits" not in lean and lean["aux_features"].shape[:2] == (1, 32)
        torch.testing.assert_close(lean["pred_points"], full["pred_points"])
        points = torch.cat([torch.rand(200, 2) * torch.tensor([width - 1.0, height - 1.0]),
                            torch.tensor([[0.0, 0.0], [width - 1.0, height - 1.0], [-3.0, 5.0], [width + 2.0, 1.0]])])
        at_points = net.region_logits_at(lean["aux_features"], points, size)
        expected = full["aux_logits"][0, 0].reshape(-1)
        cols = torch.floor(points[:, 0] + 0.5).long().clamp(0, width - 1)
        rows = torch.floor(points[:, 1] + 0.5).long().clamp(0, height - 1)
        torch.testing.assert_close(at_points, expected[rows * width + cols], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(at_points.sigmoid(), sample_mask_probability(full["aux_logits"][0], points),
                                   rtol=1e-5, atol=1e-5)
        # decoding with the map, or with the head at the candidates only, keeps the same prompts; the logits are
        # centred on the map's median so that the region filter keeps about half of them
        centre = float(full["aux_logits"].median())
        logits = full["pred_logits"].clone()
        logits[..., -1] = -10.0  # every anchor a nucleus: the region filter decides
        with_map = {**full, "pred_logits": logits, "aux_logits": full["aux_logits"] - centre}
        a = decode_prompts(with_map, size, nms_radius=None)[0]
        b = decode_prompts({**lean, "pred_logits": logits}, size, nms_radius=None,
                           region_logits_at=lambda p2, pts, sz: net.region_logits_at(p2, pts, sz) - centre)[0]
        assert 0 < len(a["points"]) < full["pred_points"].shape[1]
        torch.testing.assert_close(a["points"], b["points"])
    with pytest.raises(KeyError, match="aux_logits"):
        decode_prompts(lean, size)  # P2 without the head to read it
