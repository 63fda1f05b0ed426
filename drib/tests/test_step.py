"""The training step's gradients: the gates get d(CE + lam * R (+ balance)) / d(gates), the backbone
d(CE) / d(backbone), whichever way the one-forward step runs its backward passes."""

import pytest
import torch
import torch.nn.functional as F

from common.backbones import build_backbone
from common.precision import resolve_precision
from drib.config import DribSettings
from drib.losses import balance_loss, sparsity_loss
from drib.model import DynamicNetwork
from drib.train import drib_step

TAU, SEED = 0.7, 3


class Recorder:
    """An optimiser stand-in that keeps the gradients it is asked to apply and changes nothing."""

    def __init__(self, params):
        self.params = list(params)
        self.param_groups = [{"params": self.params}]
        self.grads = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        self.grads = [None if p.grad is None else p.grad.clone() for p in self.params]


def _tiny(balance: float) -> tuple[DynamicNetwork, DribSettings]:
    torch.manual_seed(0)
    config = DribSettings.from_dict({"decision": {"actions": 4, "alternate": False, "regulariser": "macs",
                                                  "target": 0.3, "lam": 5.0, "balance": balance},
                                     "train": {"precision": "fp32"}})
    net = DynamicNetwork(build_backbone("resnet20", 10), config.decision, input_size=(3, 8, 8))
    with torch.no_grad():  # code books away from all-ones, so rows differ and every term has a gradient
        for gate in net.gates:
            gate.codebook.uniform_(0.2, 2.0)
    return net, config


def _grads(loss, params):
    return [torch.zeros_like(p) if g is None else g
            for p, g in zip(params, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))]


def _expected(net: DynamicNetwork, config: DribSettings, x, y, finetuning: bool):
    """Gradients by their definition, from one forward with the step's Gumbel noise."""
    torch.manual_seed(SEED)
    net.train()
    net.set_tau(TAU)
    for gate in net.gates:
        gate.train(not finetuning)
    ce = F.cross_entropy(net(x), y)
    total = ce + config.decision.lam * sparsity_loss(net, net.masks(), config)
    if config.decision.balance > 0 and not finetuning:
        total = total + config.decision.balance * balance_loss(net)
    gates, backbone = net.gate_parameters(), net.backbone_parameters()
    return _grads(total, gates), _grads(ce, backbone), _grads(total, backbone)


def _step(net: DynamicNetwork, config: DribSettings, x, y, finetuning: bool, separate: bool):
    gate_opt, backbone_opt = Recorder(net.gate_parameters()), Recorder(net.backbone_parameters())
    torch.manual_seed(SEED)
    drib_step(net, gate_opt, backbone_opt, resolve_precision("fp32", "cpu"), config, x, y, finetuning=finetuning,
              tau=TAU, lr=0.1, separate_backward=separate)
    fill = lambda grads, params: [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]  # noqa: E731
    gates = None if gate_opt.grads is None else fill(gate_opt.grads, gate_opt.params)
    return gates, fill(backbone_opt.grads, backbone_opt.params)


def _close(a, b) -> bool:
    return all(torch.allclose(u, v, rtol=1e-4, atol=1e-6) for u, v in zip(a, b))


@pytest.mark.parametrize("balance", [0.0, 0.3])
def test_one_backward_of_ce_plus_one_of_the_gate_terms_gives_the_defined_gradients(balance):
    net, config = _tiny(balance)  # a fresh, identical network for each way (a deep copy shares the hooks)
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    want_gates, want_backbone, total_backbone = _expected(net, config, x, y, finetuning=False)
    # the test can tell the regulariser's path apart: it reaches the gates and would reach the backbone
    assert not _close(want_backbone, total_backbone)
    for separate in (False, True):  # the one-CE-backward step, and the former two-backward step
        gates, backbone = _step(_tiny(balance)[0], config, x, y, finetuning=False, separate=separate)
        assert _close(gates, want_gates), separate
        assert _close(backbone, want_backbone), separate


def test_the_finetuning_step_trains_the_backbone_on_ce_under_argmax_decisions():
    net, config = _tiny(0.3)
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    _, want_backbone, _ = _expected(net, config, x, y, finetuning=True)
    gates, backbone = _step(_tiny(0.3)[0], config, x, y, finetuning=True, separate=False)
    assert gates is None  # the gate optimiser never steps
    assert _close(backbone, want_backbone)
