"""PICNN network: backbone -> target conv-layer (N filters) -> classifier, shared by both pathways.

Discrimination pathway: y1 = classifier(GAP(H)) (Eq. 1). Interpretation pathway: y2 = classifier(GAP(H ⊙ z))
(Eq. 2, 4), with z drawn from the row of the filter-class correspondence matrix P for the (pseudo-)label.
Because z is constant over space, GAP(H ⊙ z) = GAP(H) ⊙ z: the mask is applied to the pooled features,
which gives the same y2 without a second pass over the feature maps.

Target layer (``resolve_target``): by default the paper's configuration, an added 3x3 conv of round(12.8 K)
filters (128 for CIFAR-10) and a new classifier, whose MACs count; ``target_layer="last_stage"`` uses the
backbone's last conv stage itself (no added layer, the plain network's MACs, its pretrained classifier kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.backbones import Backbone
from common.precision import full_precision

from .config import ASSIGNMENTS, CLUSTER_INDEX, TARGET_LAYERS
from .sampling import bernoulli_assignment, gumbel_assignment, pseudo_label

FILTER_TO_CLASS_RATIO = 12.8  # the paper's N / K: 128 filters for 10 classes


def default_target_filters(num_classes: int, ratio: float = FILTER_TO_CLASS_RATIO) -> int:
    """N = round(ratio * K), at least one filter per class (the width of an added target layer)."""
    return max(num_classes, round(ratio * num_classes))


def resolve_target(feature_channels: int, num_classes: int, filters: int | None = None,
                   target_layer: str = "added") -> tuple[int, bool]:
    """(N, added): the target layer's width and whether a target conv is added after the backbone.

    ``"added"`` (the paper's): a conv of ``filters`` filters, ``default_target_filters(K)`` when None.
    ``"last_stage"``: the backbone's last stage, N = its width (``filters`` must then be None or that width).
    """
    if target_layer not in TARGET_LAYERS:
        raise ValueError(f"target_layer must be one of {TARGET_LAYERS}, got {target_layer!r}")
    if target_layer == "last_stage":
        if filters is not None and int(filters) != feature_channels:
            raise ValueError(f"target_layer 'last_stage' has the backbone's {feature_channels} filters, not "
                             f"filters={filters}; drop filters or use target_layer 'added'")
        if feature_channels < num_classes:
            raise ValueError(f"the backbone's last stage has {feature_channels} channels, fewer than the "
                             f"{num_classes} classes; use target_layer 'added'")
        return int(feature_channels), False
    filters = default_target_filters(num_classes) if filters is None else int(filters)
    if filters < 1:
        raise ValueError(f"the target layer needs at least one filter, got {filters}")
    return filters, True


class TargetConv(nn.Module):
    """The added target conv-layer: 3x3 conv + BN + ReLU from the backbone's last map to N filters."""

    def __init__(self, in_channels: int, filters: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, filters, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(filters)
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class CorrespondenceMatrix(nn.Module):
    """The learnable filter-class correspondence matrix P (K x N), entries in [0, 1].

    P = softmax over classes of free logits, so every filter spreads one unit of probability over the
    classes and the expected cluster size sum_i p_{y,i} averages N / K (the filter-to-class ratio).
    Logits start at U(0, 1): a random P, as the paper initialises it.
    """

    def __init__(self, num_classes: int, filters: int):
        super().__init__()
        self.logits = nn.Parameter(torch.rand(num_classes, filters))

    def forward(self) -> Tensor:
        return torch.softmax(self.logits, dim=0)

    def argmax_clusters(self) -> Tensor:
        """Deterministic assignment Z (K x N bool): each filter joins the class of its largest p_{y,i}."""
        with torch.no_grad():
            owner = self.logits.argmax(dim=0)
            return F.one_hot(owner, self.logits.shape[0]).T.bool()


@dataclass
class PathwayOutput:
    y1_logits: Tensor  # discrimination pathway, B x K
    y2_logits: Tensor  # interpretation pathway, B x K
    cluster: Tensor  # one-hot (pseudo-)label that indexed P, B x K
    z: Tensor  # filter-cluster assignment, B x N


class PicnnNet(nn.Module):
    """A backbone with PICNN's target layer, classifier and correspondence matrix.

    The target layer follows ``resolve_target``: by default a ``TargetConv`` of width N and a new classifier
    are added (the paper's configuration); with ``target_layer="last_stage"`` the backbone's last feature map
    is the target, its own (pretrained) classifier is kept and the network costs exactly the backbone's MACs.
    ``forward`` is the discrimination pathway (pixels in [0, 1] -> logits).
    """

    def __init__(self, backbone: Backbone, num_classes: int, filters: int | None = None,
                 target_layer: str = "added"):
        super().__init__()
        filters, added = resolve_target(backbone.feature_channels, num_classes, filters, target_layer)
        self.backbone = backbone
        self.num_classes = num_classes
        self.filters = filters
        self.added_target_conv = added
        if self.added_target_conv:
            self.target: nn.Module = TargetConv(backbone.feature_channels, filters)
            self.classifier = nn.Linear(filters, num_classes)
        else:
            self.target = nn.Identity()  # its output is the backbone's last map: hookable for Grad-CAM/MIS
            if backbone.classifier.out_features != num_classes:
                raise ValueError(
                    f"backbone classifier has {backbone.classifier.out_features} outputs, expected {num_classes}"
                )
            self.classifier = backbone.classifier
        self.correspondence = CorrespondenceMatrix(num_classes, filters)

    @property
    def target_layer(self) -> nn.Module:
        """The module whose output is H, the target conv-layer's feature maps (for Grad-CAM and MIS)."""
        return self.target

    def unused_parameters(self) -> list[nn.Parameter]:
        """The backbone's own classifier when a new one replaced it (kept only so weights still load)."""
        return list(self.backbone.classifier.parameters()) if self.added_target_conv else []

    def feature_maps(self, x: Tensor) -> Tensor:
        """H: B x N x h x w."""
        return self.target(self.backbone.forward_features(x))

    def pooled_features(self, x: Tensor) -> Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.feature_maps(x), 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pooled_features(x))

    def pathways(self, x: Tensor, labels: Tensor, *, assignment: str = "bernoulli", cluster_index: str = "pseudo",
                 gumbel_temperature: float = 0.01) -> PathwayOutput:
        """Both pathways for one batch (training). ``cluster_index='label'`` indexes P with the true label,
        the leaking variant that admits the trivial solution of Fig. 4."""
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
        if cluster_index not in CLUSTER_INDEX:
            raise ValueError(f"cluster_index must be one of {CLUSTER_INDEX}, got {cluster_index!r}")
        pooled = self.pooled_features(x)
        y1_logits = self.classifier(pooled)
        # The samplers compare probabilities with uniform noise: always in float32, outside any autocast.
        with full_precision(x.device):
            if cluster_index == "pseudo":
                cluster = pseudo_label(torch.softmax(y1_logits.float(), dim=1))  # Eq. 8-10
            else:
                cluster = F.one_hot(labels, self.num_classes).float()
            if assignment == "bernoulli":
                p_rows = cluster @ self.correspondence().float()  # p_y~ for every sample: B x N
                z = bernoulli_assignment(p_rows)  # Eq. 5-7
            else:
                relaxed = gumbel_assignment(self.correspondence.logits.float(), x.shape[0], gumbel_temperature)
                z = torch.einsum("bk,bkn->bn", cluster, relaxed)
        y2_logits = self.classifier(pooled * z.to(pooled.dtype))  # Eq. 4, pooled (see module docstring)
        return PathwayOutput(y1_logits, y2_logits, cluster, z)

