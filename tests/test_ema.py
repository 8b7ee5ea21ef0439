"""The prompter's weight average (``scripts/training/ema.py``): the formula, the switch and its strict parsing, the
checkpoints that keep it (``last.pt``: both; ``best.pt``: the average) and a resumed training that continues it
exactly; in ``configs/train.json`` validation runs the average when it is on."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

from conftest import BUNDLE_ROOT
from scripts.training.checkpoints import TrainingCheckpointer
from scripts.training.ema import WeightEMA, as_decay

pytestmark = pytest.mark.usefixtures("one_thread")

INPUTS = torch.linspace(-1, 1, 24).reshape(6, 4)
TARGETS = INPUTS.sum(dim=1, keepdim=True) * 0.5


def _network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1))


def _trainer(network: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Engine:
    """SGD on a fixed batch: deterministic, one iteration per epoch."""

    def step(engine: Engine, batch: tuple) -> float:
        network.train()
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(network(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        return loss.item()

    return Engine(step)


def test_average_follows_the_formula() -> None:
    """ema_t = d * ema_{t-1} + (1 - d) * w_t after every iteration, from the weights at construction; the average
    differs from the trained weights; batch-norm statistics are averaged too."""
    network = _network()
    ema = WeightEMA(network, decay="0.9")
    assert ema.enabled and ema.network is not network
    trainer = _trainer(network, torch.optim.SGD(network.parameters(), lr=0.05))
    ema.attach(trainer)
    expected = {k: v.clone().float() for k, v in network.state_dict().items() if v.is_floating_point()}

    @trainer.on(Events.ITERATION_COMPLETED)
    def follow(engine: Engine) -> None:  # attached after the average: sees the weights it averaged
        for key, value in network.state_dict().items():
            if key in expected:
                expected[key] = 0.9 * expected[key] + 0.1 * value.float()

    trainer.run([(INPUTS, TARGETS)], max_epochs=4)
    averaged, trained = ema.network.state_dict(), network.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key], value, atol=1e-6, rtol=1e-5, msg=key)
    for key in ("0.weight", "2.weight", "1.running_mean"):  # (0.bias gets no gradient through the batch norm)
        assert (averaged[key] - trained[key]).abs().max() > 1e-5, key  # 10x the tolerance


@pytest.mark.parametrize("off", [None, 0, "0", "none", "null", 0.0])
def test_off_is_the_network_itself(off) -> None:
    network = _network()
    ema = WeightEMA(network, decay=off)
    assert not ema.enabled and ema.network is network
    trainer = _trainer(network, torch.optim.SGD(network.parameters(), lr=0.5))
    ema.attach(trainer)
    trainer.run([(INPUTS, TARGETS)], max_epochs=1)  # nothing attached: runs as without it


@pytest.mark.parametrize("bad", [1, "1.0", 1.5, -0.1, "0.99x", "true", True])
def test_bad_decay_is_named(bad) -> None:
    with pytest.raises(ValueError, match="prompter#hparams#ema"):
        as_decay(bad, "prompter#hparams#ema")


def _train(save_dir, max_epochs: int, resume: bool) -> tuple[torch.nn.Module, WeightEMA, TrainingCheckpointer]:
    """Train the small network with the average on and the checkpointer attached (no validation: best follows
    last)."""
    network = _network()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.3, momentum=0.9)
    ema = WeightEMA(network, decay=0.8)
    trainer = _trainer(network, optimizer)
    ema.attach(trainer)
    checkpointer = TrainingCheckpointer(str(save_dir), {"network": network, "optimizer": optimizer}, resume=resume,
                                        ema=ema)
    checkpointer.attach(trainer)
    trainer.run([(INPUTS, TARGETS)], max_epochs=max_epochs)
    return network, ema, checkpointer


def test_checkpoints_keep_the_average_and_a_resumed_training_continues_it(tmp_path) -> None:
    network, ema, checkpointer = _train(tmp_path / "a", max_epochs=2, resume=False)
    last = torch.load(checkpointer.last_path, weights_only=True)
    best = torch.load(checkpointer.best_path, weights_only=True)
    for key, value in ema.network.state_dict().items():
        torch.testing.assert_close(last["ema"][key], value, msg=key)
        torch.testing.assert_close(best["network"][key], value, msg=key)  # best.pt: the weights validation saw
        torch.testing.assert_close(last["network"][key], network.state_dict()[key], msg=key)
    assert not torch.equal(best["network"]["0.weight"], last["network"]["0.weight"])

    straight_network, straight_ema, _ = _train(tmp_path / "b", max_epochs=4, resume=False)
    resumed_network, resumed_ema, resumed = _train(tmp_path / "a", max_epochs=4, resume=True)
    assert resumed.resumed_from == checkpointer.last_path
    for key, value in straight_ema.network.state_dict().items():
        torch.testing.assert_close(resumed_ema.network.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)
    for key, value in straight_network.state_dict().items():
        torch.testing.assert_close(resumed_network.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)


def test_resuming_a_checkpoint_without_the_average_is_named(tmp_path) -> None:
    """A training started without the average cannot be resumed with it on: the error names the missing entry."""
    network = _network()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.3)
    trainer = _trainer(network, optimizer)
    TrainingCheckpointer(str(tmp_path), {"network": network, "optimizer": optimizer}, resume=False).attach(trainer)
    trainer.run([(INPUTS, TARGETS)], max_epochs=1)
    with pytest.raises(KeyError, match="'ema'"):
        _train(tmp_path, max_epochs=2, resume=True)


@pytest.mark.parametrize("decay", [None, 0.99])
def test_train_config_validates_the_average(decay) -> None:
    """``prompter#hparams#ema``: off (the CPU default) validation runs the trained network; on, the average, which
    ``best.pt`` stores and ``last.pt`` keeps."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLE_ROOT), "prompter#hparams#ema": decay, "device": "cpu"})
    defaults = ConfigParser.load_config_file(str(BUNDLE_ROOT / "configs" / "train.json"))
    assert defaults["prompter"]["hparams"]["ema"] is None  # off in the CPU recipe
    network = parser.get_parsed_content("prompter#network")
    evaluator_network = parser.get_parsed_content("prompter#validate#evaluator#network")
    handlers = parser.get_parsed_content("prompter#train#handlers")
    ema = parser.get_parsed_content("prompter#ema")
    checkpointer = next(h for h in handlers if isinstance(h, TrainingCheckpointer))
    assert ema in handlers
    if decay is None:
        assert evaluator_network is network and "ema" not in checkpointer.save_dict
        assert checkpointer.best_network is network
    else:
        assert evaluator_network is ema.network and evaluator_network is not network
        assert checkpointer.save_dict["ema"] is ema.network and checkpointer.best_network is ema.network
