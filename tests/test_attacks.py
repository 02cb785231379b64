"""Attacks factory, RobustAccuracy metric and evaluate_under_attack, on a small model trained on digits."""

from __future__ import annotations

import os

import pytest
import torch
import torchattacks
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_specclip.attacks import (
    ATTACK_DEFAULTS,
    ATTACK_NAMES,
    RobustAccuracy,
    build_attack,
    evaluate_under_attack,
    robust_accuracy,
)
from lightning_specclip.data import DigitsDataModule
from lightning_specclip.models import SimpleConv


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, DataLoader]:
    """A SimpleConv trained for a few steps on digits (with BatchNorm, to exercise eval mode)."""
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    model = SimpleConv(in_channels=1, num_classes=10, channels=8, batchnorm=True, mean=dm.mean, std=dm.std)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(2):
        for x, y in dm.train_dataloader():
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    loader = DataLoader(Subset(dm.test_set, range(128)), batch_size=64)
    return model, loader


def test_pgd_accuracy_at_most_clean(trained: tuple[nn.Module, DataLoader]) -> None:
    model, loader = trained
    clean = evaluate_under_attack(model, None, loader, "cpu")
    assert clean > 0.7
    pgd = evaluate_under_attack(model, build_attack("pgd", model, eps=0.1, alpha=0.025, steps=5), loader, "cpu")
    assert 0.0 <= pgd <= clean
    assert pgd < clean - 0.1  # eps=0.1 on [0, 1] digits is a strong attack for an undefended model


def test_evaluate_restores_modes_and_leaves_no_grads(trained: tuple[nn.Module, DataLoader]) -> None:
    model, loader = trained
    model.train()
    model.fc.requires_grad_(False)
    try:
        evaluate_under_attack(model, build_attack("cw", model, steps=3), loader, "cpu", max_batches=1)
        assert model.training and model.bn.training
        assert [p.requires_grad for p in model.parameters()] == [True, True, True, False, False]
        assert all(p.grad is None for p in model.parameters())
        running_mean = model.bn.running_mean.clone()
        evaluate_under_attack(model, build_attack("fgsm", model), loader, "cpu", max_batches=1)
        assert torch.equal(model.bn.running_mean, running_mean)  # BN ran in eval mode
    finally:
        model.fc.requires_grad_(True)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_evaluate_works_without_grad_mode(trained: tuple[nn.Module, DataLoader], context: str) -> None:
    model, loader = trained
    attack = build_attack("pgd", model, eps=0.1, alpha=0.025, steps=3)
    batch = next(iter(loader))
    torch.manual_seed(1)
    expected = evaluate_under_attack(model, attack, [batch], "cpu")
    ctx = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with ctx:
        # Lightning's test loop yields batches created in inference mode
        batches = [(batch[0].clone(), batch[1].clone())]
        torch.manual_seed(1)
        got = evaluate_under_attack(model, attack, batches, "cpu")
    assert got == pytest.approx(expected)


def test_fgsm_stays_in_eps_ball_and_unit_box(trained: tuple[nn.Module, DataLoader]) -> None:
    model, loader = trained
    eps = 0.05
    attack = build_attack("fgsm", model, eps=eps)
    x, y = next(iter(loader))
    x_adv = attack(x, y)
    assert x_adv.shape == x.shape
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float((x_adv - x).abs().max()) > eps / 2  # it did perturb


def test_pgd_l2_stays_in_ball(trained: tuple[nn.Module, DataLoader]) -> None:
    model, loader = trained
    attack = build_attack("pgd_l2", model, eps=0.3, alpha=0.1, steps=3)
    x, y = next(iter(loader))
    delta = attack(x, y) - x
    assert float(delta.flatten(1).norm(dim=1).max()) <= 0.3 + 1e-5


def test_inputs_outside_unit_box_are_rejected(trained: tuple[nn.Module, DataLoader]) -> None:
    model, _ = trained
    batches = [(torch.randn(4, 1, 8, 8) * 3, torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ValueError, match=r"in \[0, 1\].*inside the model"):
        evaluate_under_attack(model, build_attack("fgsm", model), batches, "cpu")


def test_build_attack_names_defaults_and_errors() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    assert build_attack("none", model) is None
    assert build_attack("none", model, eps=1.0) is None
    for name, (class_name, defaults) in ATTACK_DEFAULTS.items():
        attack = build_attack(name, model)
        assert type(attack) is getattr(torchattacks, class_name)
        for key, value in defaults.items():
            assert getattr(attack, key) == value, (name, key)
    assert build_attack("autoattack", model, n_classes=3).n_classes == 3
    with pytest.raises(
        ValueError, match="unknown attack 'pdg'; allowed names: none, fgsm, pgd, pgd_l2, cw, autoattack"
    ):
        build_attack("pdg", model)
    with pytest.raises(TypeError, match="unexpected argument.*epsilon.*accepts: eps, alpha, steps, random_start"):
        build_attack("pgd", model, epsilon=0.1)
    assert set(ATTACK_NAMES) == {"none", "fgsm", "pgd", "pgd_l2", "cw", "autoattack"}


def test_robust_accuracy_metric_sums() -> None:
    metric = RobustAccuracy()
    with pytest.warns(UserWarning, match="called before the ``update``"):
        assert torch.isnan(metric.compute())
    metric = RobustAccuracy()
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    metric.update(logits, torch.tensor([0, 1, 0]))  # 2 of 3
    metric.update(torch.tensor([2, 2]), torch.tensor([2, 1]))  # 1 of 2, labels form
    assert int(metric.correct) == 3 and int(metric.total) == 5
    # the DDP reduction: states of two "ranks" are summed, not averaged (mean of 0.6 and 1.0 would be 0.8)
    other = RobustAccuracy()
    other.update(torch.tensor([0] * 10), torch.tensor([0] * 10))
    metric.merge_state(other)
    assert float(metric.compute()) == pytest.approx(13 / 15)
    assert float(robust_accuracy(logits, torch.tensor([0, 1, 0]))) == pytest.approx(2 / 3)
    metric.reset()
    assert int(metric.total) == 0
    with pytest.raises(ValueError, match="preds must be logits"):
        metric.update(torch.zeros(3, 2, 2), torch.zeros(2, dtype=torch.long))


def _ddp_worker(rank: int, world_size: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    metric = RobustAccuracy()
    # rank 0: 3 of 4 correct; rank 1: 0 of 1 correct → global 3/5 (a mean of rank accuracies would be 0.375)
    if rank == 0:
        metric.update(torch.tensor([1, 1, 1, 0]), torch.tensor([1, 1, 1, 1]))
    else:
        metric.update(torch.tensor([0]), torch.tensor([1]))
    value = float(metric.compute())
    # evaluate_under_attack: rank 0 has 4 correct samples, rank 1 one wrong sample → 0.8 over both ranks
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]))
    x = torch.tensor([[0.9, 0.1, 0.0, 0.0]]).repeat(4 if rank == 0 else 1, 1).view(-1, 1, 2, 2)
    y = torch.zeros(len(x), dtype=torch.long) if rank == 0 else torch.ones(1, dtype=torch.long)
    synced = evaluate_under_attack(model, None, [(x, y)], "cpu")
    local = evaluate_under_attack(model, None, [(x, y)], "cpu", sync=False)
    torch.save((value, synced, local), f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_robust_accuracy_under_ddp(tmp_path: os.PathLike) -> None:
    import torch.multiprocessing as mp

    out = str(tmp_path / "acc")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    results = [torch.load(f"{out}.{r}") for r in range(2)]
    assert [r[0] for r in results] == [pytest.approx(0.6)] * 2  # RobustAccuracy over both ranks
    assert [r[1] for r in results] == [pytest.approx(0.8)] * 2  # evaluate_under_attack, synced
    assert [r[2] for r in results] == [1.0, 0.0]  # sync=False: each rank's own


@pytest.mark.slow
def test_autoattack_runs_on_a_small_batch(trained: tuple[nn.Module, DataLoader]) -> None:
    model, loader = trained
    x, y = next(iter(loader))
    attack = build_attack("autoattack", model, eps=0.1)
    acc = evaluate_under_attack(model, attack, [(x[:16], y[:16])], "cpu")
    clean = evaluate_under_attack(model, None, [(x[:16], y[:16])], "cpu")
    assert 0.0 <= acc <= clean
