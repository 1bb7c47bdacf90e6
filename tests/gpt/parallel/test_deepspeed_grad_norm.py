"""DeepSpeed's gradient norm stays where the engine left it (on the GPU) until a log step reads it: a step makes
no host read of it. A meta tensor stands in for a GPU tensor here: it cannot be read to the host at all, so any
read inside the step fails."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from gpt.config.strategy import StrategyConfig
from gpt.collectives.process_group import DistEnv
from gpt.parallel.deepspeed import DeepSpeed
from gpt.parallel.layout import ParallelDims


class FakeEngine:
    """The engine calls DeepSpeed.train_step makes, on one linear layer."""

    def __init__(self) -> None:
        self.layer = torch.nn.Linear(4, 1)
        self._config = SimpleNamespace(gradient_clipping=0.0)
        self.optimizer = SimpleNamespace(overflow=False)  # a ZeRO optimizer: it checks the norm itself
        self.steps = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, (self.layer(x) - y).pow(2).mean()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.steps += 1

    def set_train_micro_batch_size(self, n: int) -> None:
        pass

    def set_train_batch_size(self, n: int) -> None:
        pass

    def was_step_applied(self) -> bool:  # ZeRO's verdict, a host value it read already
        return True

    def get_global_grad_norm(self) -> torch.Tensor:
        return torch.tensor(1.5, device="meta")  # the norm ZeRO computed, still on the device


def test_a_step_leaves_the_grad_norm_on_the_device():
    strategy = DeepSpeed(StrategyConfig(name="deepspeed"), DistEnv(), torch.device("cpu"), "fp32", ParallelDims())
    strategy.engine = FakeEngine()
    strategy.optimizer = torch.optim.SGD(strategy.engine.layer.parameters(), lr=0.1)
    batch = (torch.ones(2, 4), torch.zeros(2, 1))
    result = strategy.train_step([batch, batch], 2, 1e-3, 1.0)
    assert result.grad_norm.device.type == "meta" and strategy.engine.steps == 2
    assert set(result.clock.seconds()) == {"fwd_bwd_s", "optimizer_s"}  # the engine's step is the optimizer's
