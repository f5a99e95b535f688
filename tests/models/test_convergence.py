"""Short convergence test: a CIFAR ResNet-20 trained with SGD, fused vs eager PyTorch, loss by loss."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from test_cifar import eager_forward

from fused_resnet import _ext, models

STEPS = 30
# float32 on both sides. The two differ only by rounding (reduction orders in BN statistics and
# gradients), which SGD with momentum carries forward: measured drift over these 30 steps is
# <= 1e-4 relative in the loss and in every parameter (and 1e-13 when the same run is made in
# float64, i.e. the trajectories are the same). RTOL = 1e-3 leaves room for other CPUs and thread
# counts while any real difference (a wrong gradient, a missed running-stat update) moves the loss
# by far more within a few steps.
RTOL = 1e-3


def test_resnet20_sgd_losses_match_eager():
    backend = "cpu" if _ext.available() else "torch"  # the compiled kernels when there are any
    torch.manual_seed(0)
    fused = models.cifar_resnet20(backend=backend)
    eager = copy.deepcopy(fused)
    eager.load_state_dict(fused.state_dict(), strict=True)  # same init
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(3)]
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    losses = []
    for step in range(STEPS):
        x, y = batches[step % len(batches)]
        pair = []
        for forward, opt in ((fused, opt_f), (lambda t: eager_forward(eager, t), opt_e)):
            opt.zero_grad()
            loss = F.cross_entropy(forward(x), y)
            loss.backward()
            opt.step()
            pair.append(loss.item())
        losses.append(pair[1])
        assert abs(pair[0] - pair[1]) <= RTOL * max(1.0, abs(pair[1])), f"step {step}: fused {pair[0]} eager {pair[1]}"
    assert min(losses[-10:]) < 0.5 * losses[0], f"training did not reduce the loss: {losses}"
    for (name, a), b in zip(fused.named_parameters(), eager.parameters(), strict=True):
        err = (a - b).abs().max().item()
        assert err <= RTOL * max(1.0, b.abs().max().item()), f"{name}: {err:.3e}"
    for (name, a), b in zip(fused.named_buffers(), eager.buffers(), strict=True):
        if name.endswith("num_batches_tracked"):
            assert a.item() == b.item() == STEPS, name
        else:
            err = (a - b).abs().max().item()
            assert err <= RTOL * max(1.0, b.abs().max().item()), f"{name}: {err:.3e}"
