"""The ``ClipMethod`` contract for the baselines (Gouk, Miyato, Senderovich): ``after`` is the measured norm of what
they wrote, ``changed`` says whether they wrote, and a miss is reported next to the method's own estimate.
"""

from __future__ import annotations

import pytest
import torch
from helpers import snapshot, unchanged
from torch import Tensor, nn

from lightning_specclip.methods import Gouk, Miyato, Senderovich
from lightning_specclip.spectral.spectrum import spectrum
from lightning_specclip.targets import TrackedMap
from lightning_specclip.tracking import ground_truth_sigma

TOL = 1e-2  # the relative tolerance these tests allow the library


def _target(module: nn.Module, shape) -> TrackedMap:
    return TrackedMap("layer", "layer", module, module, input_shape=tuple(shape))


@pytest.mark.parametrize(
    ("method", "factory", "shape"),
    [
        (Gouk, lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), (3, 8, 8)),
        (Gouk, lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 8, 8)),
        (Miyato, lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 8, 8)),
        (Miyato, lambda: nn.Linear(7, 5), (7,)),
        (Senderovich, lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), (3, 8, 8)),
        (Senderovich, lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (3, 8, 8)),
    ],
)
def test_baselines_report_the_measured_norm_of_what_they_wrote(method, factory, shape) -> None:
    torch.manual_seed(0)
    module = factory()
    with torch.no_grad():
        module.weight.mul_(3.0 / ground_truth_sigma(module, shape))
    clipper = method()
    target = _target(module, shape)
    state: dict[str, Tensor] = {}
    result = clipper.clip_(target, 1.0, state, None)
    truth = ground_truth_sigma(module, shape)
    assert result.after == pytest.approx(truth, rel=1e-4), (result.after, truth)
    assert result.spectrum is not None and result.spectrum.sigma == result.after
    assert result.changed and result.estimate is not None
    assert result.converged == (truth <= 1.0 * (1 + TOL))
    # warm-started from tracked vectors: that many are measured (the callback can reuse them)
    tracked = spectrum(module, shape, k=2).right
    again = clipper.clip_(target, 10.0, state, tracked)
    assert not again.changed and again.spectrum.right.shape[0] == 2
    assert again.after == pytest.approx(truth, rel=1e-4)


def test_baselines_that_do_not_write_say_so_and_leave_the_bits() -> None:
    torch.manual_seed(0)
    shape = (3, 8, 8)
    for clipper in (Gouk(), Miyato(), Senderovich()):
        conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")
        snap = snapshot(conv)
        result = clipper.clip_(_target(conv, shape), 100.0, {}, None)
        assert unchanged(conv, snap), type(clipper).__name__
        assert result.after == pytest.approx(ground_truth_sigma(conv, shape), rel=1e-4)
        assert not result.changed


def test_gouk_on_circular_padding_reports_its_miss() -> None:
    torch.manual_seed(0)
    shape = (3, 8, 8)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")
    with torch.no_grad():
        conv.weight.mul_(3.0 / ground_truth_sigma(conv, shape))
    result = Gouk(n_iter_clip=200).clip_(_target(conv, shape), 1.0, {}, None)
    truth = ground_truth_sigma(conv, shape)
    assert truth > 1.0 * (1 + TOL) and result.after == pytest.approx(truth, rel=1e-4)  # the measurement ...
    assert not result.converged
    assert result.estimate == pytest.approx(1.0, rel=1e-4)  # ... next to its own estimate, which says "done"
