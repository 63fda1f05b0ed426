"""Fig. 4: indexing P with the true label leaks it into the interpretation pathway (L_int collapses even
when the images carry no information), while the pseudo-label of Eq. 8-10 does not leak."""

import math

import torch

from picnn.losses import picnn_losses
from picnn.model import PicnnNet

from .conftest import TinyBackbone

CLASSES = 4


def _final_l_int(cluster_index: str, steps: int = 150) -> float:
    torch.manual_seed(0)
    model = PicnnNet(TinyBackbone(CLASSES, width=16), CLASSES, target_layer="last_stage")
    optimizer = torch.optim.Adam([
        {"params": [p for n, p in model.named_parameters() if not n.startswith("correspondence")], "lr": 1e-2},
        {"params": model.correspondence.parameters(), "lr": 0.1},
    ])
    recent = []
    for step in range(steps):
        x = torch.rand(64, 3, 8, 8)  # fresh noise every step: nothing to learn or memorise
        y = torch.randint(0, CLASSES, (64,))
        out = model.pathways(x, y, cluster_index=cluster_index)
        loss, _l_dis, l_int = picnn_losses(out, y, lam=2.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= steps - 20:
            recent.append(l_int.item())
    return sum(recent) / len(recent)


def test_label_indexing_collapses_l_int_but_the_pseudo_label_does_not():
    chance = math.log(CLASSES)
    leaked = _final_l_int("label")
    pseudo = _final_l_int("pseudo")
    assert leaked < 0.5 * chance, leaked
    assert pseudo > 0.9 * chance, pseudo
