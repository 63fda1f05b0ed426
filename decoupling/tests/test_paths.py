"""Filter states, Hopkins statistic, the decision tree and the occlusion analysis on planted data."""

import numpy as np
import pytest
import torch

from common.backbones import build_backbone
from decoupling.model import DecoupledNet
from decoupling.paths import (
    Paths,
    classify_filters,
    decision_tree,
    embed_paths,
    format_tree,
    hopkins_statistic,
    layer_slices,
    occlusion_analysis,
)


def test_filter_states_on_planted_gates():
    # layer A (3 filters): always on, never on, sometimes on; layer B (2 filters): sometimes, always
    codes = np.array([[1, 0, 1, 1, 1],
                      [1, 0, 0, 0, 1],
                      [1, 0, 1, 1, 1]], dtype=np.uint8)
    states = classify_filters(codes, layer_slices([3, 2]), ["A", "B"])
    assert states.per_layer == [{"energetic": 1, "silent": 1, "dynamic": 1},
                                {"energetic": 1, "silent": 0, "dynamic": 1}]
    assert states.fractions == pytest.approx({"energetic": 0.4, "silent": 0.2, "dynamic": 0.4})
    assert states.firing_counts[0].tolist() == [3, 0, 2]
    with pytest.raises(ValueError):
        classify_filters(codes[:0], layer_slices([3, 2]), ["A", "B"])


def test_hopkins_separates_clustered_from_uniform_data():
    rng = np.random.default_rng(0)
    uniform = rng.uniform(size=(400, 3))
    clustered = np.concatenate([rng.normal(0, 0.01, (200, 3)), rng.normal(1, 0.01, (200, 3))])
    assert 0.35 < hopkins_statistic(uniform) < 0.65
    assert hopkins_statistic(clustered) > 0.9


def _planted_paths() -> Paths:
    """Layer 0: every input shares its code. Layer 1: classes {0, 1} and {2, 3} take different filters.
    Layer 2: class 0 differs from class 1."""
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for c in range(4):
        for _ in range(12):
            layer0 = np.ones(6)
            layer1 = np.r_[np.ones(4), np.zeros(4)] if c < 2 else np.r_[np.zeros(4), np.ones(4)]
            layer2 = np.r_[np.ones(3), np.zeros(3)] if c % 2 == 0 else np.r_[np.zeros(3), np.ones(3)]
            flip = rng.random(8) < 0.05  # a little noise in layer 1
            layer1 = np.where(flip, 1 - layer1, layer1)
            rows.append(np.r_[layer0, layer1, layer2])
            labels.append(c)
    return Paths(np.array(rows, dtype=np.uint8), np.array(labels), ["l0", "l1", "l2"], layer_slices([6, 8, 6]))


def test_decision_tree_splits_where_the_paths_part():
    paths = _planted_paths()
    tree = decision_tree(paths, max_depth=2)
    assert tree.layer == 1  # nothing to split at layer 0
    groups = [set(paths.labels[child.indices]) for child in tree.children]
    assert sorted(map(sorted, groups)) == [[0, 1], [2, 3]]
    assert all(child.layer == 2 and len(child.children) == 2 for child in tree.children)
    text = format_tree(tree, paths, ["a", "b", "c", "d"])
    assert "split at layer 2 (l1" in text and text.count("leaf") == 4


def test_embedding_has_one_point_per_path():
    paths = _planted_paths()
    embedding = embed_paths(paths.codes)
    assert embedding.shape == (len(paths.labels), 2) and np.isfinite(embedding).all()
    identical = embed_paths(np.ones((20, 8), dtype=np.uint8))  # degenerate: no t-SNE, no crash
    assert identical.shape == (20, 2) and np.all(identical == 0)


def test_occlusion_lists_filters_that_switch_off():
    torch.manual_seed(0)
    model = DecoupledNet(build_backbone("resnet20", 10)).eval()
    first = model.gated_layers[0]
    image = torch.full((3, 32, 32), 0.9)
    pooled = []

    def record(module, inputs):
        pooled.append(inputs[0].mean((2, 3))[0])

    hook = first.register_forward_pre_hook(record)
    with torch.no_grad():
        model(image[None])
        model(torch.zeros(1, 3, 32, 32))
    hook.remove()
    direction = pooled[0] - pooled[1]
    with torch.no_grad():  # filter 0 of the first gated layer fires for the bright image only
        first.controller.fc1.weight.zero_()
        first.controller.fc1.bias.zero_()
        first.controller.fc1.weight[0] = direction
        first.controller.fc1.bias[0] = -float(direction @ (pooled[0] + pooled[1])) / 2 + 1.0
        first.controller.fc2.weight.zero_()
        first.controller.fc2.weight[0, 0] = 1.0
        first.controller.fc2.bias[0] = -0.5
    result = occlusion_analysis(model, image, (0, 0, 32, 32))
    assert (0, 0) in result.switched_off
    assert all(mask.shape == (32, 32) for mask in result.receptive_fields.values())
    assert all(0.0 <= v <= 1.0 for v in result.iou.values())
    with pytest.raises(ValueError, match="does not fit"):
        occlusion_analysis(model, image, (0, 0, 40, 8))
