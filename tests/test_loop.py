"""Issue 18 (a training loop that keeps a GPU busy): the loss's device path, the leakage guard before the
transfer, pinned memory for CUDA runs, overlapped validation scoring, and the loop benchmark's numbers.
Speed is never asserted here: `make bench` measures it."""
import json

import pytest
import torch

from datamodules.label_policy import CLASS_INDEX, CLASSES, IGNORE
from lightning_modules import losses
from lightning_modules.losses import PartialDiceCELoss, merged_log_probs
from tests.args import base_args

C = len(CLASSES)


def _annotated(*names_per_sample) -> torch.Tensor:
    a = torch.zeros(len(names_per_sample), C, dtype=torch.bool)
    a[:, 0] = True
    for i, names in enumerate(names_per_sample):
        for n in names:
            a[i, CLASS_INDEX[n]] = True
    return a


LUNGS_LESION = ("lung_left", "lung_right", "lesion")
BATCHES = {
    "every class": _annotated(CLASSES[1:], CLASSES[1:]),                      # nothing to merge
    "lesion only + full": _annotated(("lesion",), LUNGS_LESION),              # merge into background
    "lung only (nested)": _annotated(("lung_left", "lung_right"), ("lesion",)),  # lesion moves into the lungs
    "typed + untyped": _annotated(("lesion", "ggo", "consolidation"), ("lesion",)),
    "background only": _annotated((), ()),                                    # no foreground class: Dice 1
}


def _target(annotated: torch.Tensor, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for a in annotated:
        allowed = torch.nonzero(a).flatten()
        t = allowed[torch.randint(len(allowed), shape, generator=g)]
        t[torch.rand(shape, generator=g) < 0.05] = IGNORE
        rows.append(t)
    return torch.stack(rows)


@pytest.mark.parametrize("name", list(BATCHES))
def test_loss_device_path_gives_the_host_path_values_and_gradients(monkeypatch, name):
    """On a GPU the loss branches on no tensor value (no host sync): it computes every branch and selects
    with torch.where. Forced here on the CPU, it must give the host path's loss and gradients."""
    annotated = BATCHES[name]
    shape = (6, 5, 4)
    target = _target(annotated, shape, seed=len(name))
    logits0 = torch.randn((len(annotated), C, *shape), generator=torch.Generator().manual_seed(1)) * 3
    loss = PartialDiceCELoss(**base_args("losses", "dice_ce"))
    results = []
    for host in (True, False):
        monkeypatch.setattr(losses, "host_decides", lambda t, host=host: host)
        x = logits0.clone().requires_grad_(True)
        value = loss(x, target, annotated)
        value.backward()
        results.append((value.detach(), x.grad, merged_log_probs(logits0, annotated, target.masked_fill(target == IGNORE, 0))))
    (v_host, g_host, m_host), (v_dev, g_dev, m_dev) = results
    torch.testing.assert_close(v_dev, v_host, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_dev, g_host, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(m_dev, m_host, rtol=0, atol=0)  # the same merged log-probabilities, exactly


def test_device_path_visits_every_container_a_batch_can_move_into():
    # nested_moves only ever names lungs (CONTAINERS); the device path visits exactly those, ascending
    assert losses._container_classes(C) == [CLASS_INDEX["lung_left"], CLASS_INDEX["lung_right"]]
    assert losses._container_classes(3) == []  # no opacity channel: nothing can be nested
