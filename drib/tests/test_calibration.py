"""The MAC calibration's bisection measures each code-book state once and reports what the final code books give."""

import hashlib

import torch

import drib.mac_target as mac_target
from common.backbones import build_backbone
from drib.config import DecisionSettings
from drib.model import DynamicNetwork


def test_each_code_book_state_is_measured_once_and_the_result_is_the_final_states():
    torch.manual_seed(0)
    net = DynamicNetwork(build_backbone("resnet20", 10), DecisionSettings(actions=3), input_size=(3, 8, 8)).eval()
    images = torch.rand(32, 3, 8, 8)
    seen: list[str] = []
    measure = mac_target.achieved_reduction

    def counting(net_, images_, batch_size=256):
        seen.append(hashlib.sha1(b"".join(g.gate.codebook.detach().numpy().tobytes() for g in net_.gated)).hexdigest())
        return measure(net_, images_, batch_size)

    mac_target.achieved_reduction = counting
    try:  # a tolerance no rounded kept count can meet: the bisection runs all its iterations
        result = mac_target.calibrate_codebooks(net, images, 0.4, tolerance=1e-9, iterations=24)
    finally:
        mac_target.achieved_reduction = measure
    bisected = seen[1:]  # after the start: each distinct state once, not 24 forwards
    assert len(bisected) == len(set(bisected)) < 24
    assert result["scale"] != 1.0, len(seen)
    assert result["after"] == measure(net, images)  # the reported reduction is that of the code books left
