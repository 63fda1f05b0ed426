"""The hard-gate fine-tuning phase: frozen controllers, deterministic (Eq. 5) gates, backbone trained."""

import pytest
import torch

from common.backbones import build_backbone
from common.data import load_dataset
from common.method import Budget
from common.run import RunDir
from decoupling.config import DecouplingSettings, resolve_settings
from decoupling.model import DecoupledNet
from decoupling.train import build_objective, finetune_start, train_decoupled


def test_finetune_start_counts_the_last_share_of_steps():
    assert finetune_start(100, DecouplingSettings(finetune_fraction=0.0)) == 100
    assert finetune_start(100, DecouplingSettings(finetune_fraction=0.25)) == 75
    with pytest.raises(ValueError, match="finetune_fraction"):
        DecouplingSettings.from_dict({"finetune_fraction": 1.0})


def test_hard_gates_are_deterministic_in_training_mode():
    torch.manual_seed(0)
    model = DecoupledNet(build_backbone("resnet20", 10), init_bias=0.3).train()
    x = torch.rand(4, 3, 32, 32)
    model.set_hard_gates(True)
    _, first = model.forward_with_paths(x)
    _, second = model.forward_with_paths(x)
    for a, b, logits in zip(first.masks, second.masks, first.logits):
        assert torch.equal(a, b) and torch.equal(a, (logits > 0).float())
    model.set_hard_gates(False)  # SemHash noise again: with G = 0.3 some gates must close at random
    _, noisy = model.forward_with_paths(x)
    assert any(not torch.equal(m, torch.ones_like(m)) for m in noisy.masks)


def test_finetuning_phase_trains_the_backbone_and_freezes_the_controllers(tmp_path):
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = DecoupledNet(build_backbone("resnet20", data.num_classes))
    settings = resolve_settings("resnet20", {"batch_size": 32, "finetune_fraction": 0.5, "log_every": 1,
                                              "precision": "fp32"})
    objective = build_objective(model, data.num_classes, settings)
    budget = Budget(epochs=1, max_batches=2)  # step 0: both phases' parameters move; step 1: fine-tuning
    after_first = {}

    def snapshot_after_step(_module, _args):
        if not after_first and model.gated_layers[0].hard_gates:
            after_first.update({n: p.detach().clone() for n, p in model.named_parameters()})

    handle = model.register_forward_pre_hook(snapshot_after_step)
    outcome = train_decoupled(model, objective, data, budget, RunDir(tmp_path), settings, torch.device("cpu"))
    handle.remove()
    assert outcome.steps == 2 and after_first
    controller = {n for n, _ in model.named_parameters() if ".controller." in n}
    final = dict(model.named_parameters())
    assert all(torch.equal(after_first[n], final[n]) for n in controller)
    assert any(not torch.equal(after_first[n], final[n]) for n in final if n not in controller)
    assert not any(layer.hard_gates for layer in model.gated_layers)
