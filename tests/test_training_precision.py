"""Training in bfloat16 (``--precision``): the trainers' forward pass under ``torch.autocast``, float32 weights,
gradients and loss; the option's wrong values are errors naming it."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import BUNDLE_ROOT
from scripts.pipeline.options import arithmetic_dtype
from scripts.training.engine import PrecisionInferer


class TwoHeads(torch.nn.Module):
    """A convolution and a linear head; records the dtype each layer computed in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 2)
        self.seen: list[torch.dtype] = []

    def forward(self, image: torch.Tensor, scale: float = 1.0) -> dict:
        feature = self.conv(image)
        logits = self.head(feature.mean((2, 3)))
        self.seen += [feature.dtype, logits.dtype]
        return {"logits": logits * scale, "maps": [feature], "count": torch.tensor(3)}


def test_bfloat16_runs_the_network_in_bfloat16_and_hands_the_loss_float32():
    torch.manual_seed(0)
    network, image = TwoHeads(), torch.rand(2, 3, 8, 8)
    pred = PrecisionInferer("bfloat16")(image, network, scale=2.0)
    assert network.seen == [torch.bfloat16, torch.bfloat16]
    assert pred["logits"].dtype == pred["maps"][0].dtype == torch.float32 and pred["count"].dtype == torch.int64
    (pred["logits"].sum() + pred["maps"][0].mean()).backward()
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in network.parameters())
    reference = network(image, scale=2.0)["logits"]
    assert not torch.equal(pred["logits"], reference)  # rounded, not the same arithmetic
    assert torch.allclose(pred["logits"], reference, atol=0.05, rtol=0.05)


def test_float32_is_the_plain_forward_pass():
    torch.manual_seed(0)
    network, image = TwoHeads(), torch.rand(2, 3, 8, 8)
    pred = PrecisionInferer("float32")(image, network)
    assert network.seen == [torch.float32, torch.float32]
    assert torch.equal(pred["logits"], network(image)["logits"])


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_is_bfloat16_only_on_cpus_with_native_bfloat16(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert arithmetic_dtype("auto", torch.device("cpu")) == expected
    assert arithmetic_dtype(" BFloat16 ", "cpu") == torch.bfloat16 and arithmetic_dtype("float32", "cpu") == torch.float32


@pytest.mark.parametrize("wrong", ["fp16", "False", "false", 0, "bfloat", None])
def test_wrong_precision_is_an_error_naming_the_option(wrong):
    with pytest.raises(ValueError, match="precision must be one of"):
        PrecisionInferer(wrong)
    parser = _training_config()
    parser["prompter#hparams#precision"] = wrong
    with pytest.raises(RuntimeError) as error:
        parser.get_parsed_content("prompter#train#trainer#inferer")
    assert "precision must be one of" in repr(error.value.__cause__)


def _training_config() -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    parser["bundle_root"] = str(BUNDLE_ROOT)
    return parser


@pytest.mark.parametrize("stage", ["prompter", "segmentor", "joint"])
def test_each_stage_trains_in_its_own_precision_hyperparameter(stage):
    parser = _training_config()
    assert parser[f"{stage}#hparams#precision"] == "float32"  # the default: the recipes' arithmetic
    parser[f"{stage}#hparams#precision"] = "bfloat16"
    inferer = parser.get_parsed_content(f"{stage}#train#trainer#inferer")
    assert isinstance(inferer, PrecisionInferer) and inferer.precision == "bfloat16"
