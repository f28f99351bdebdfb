"""Scores (energy, rep_score, id/ood score) and losses (CFL, energy, outlier repulsion)."""
import math

import ood_det  # noqa: F401  (before any detectron2 import: compat shims)
import pytest
import torch
import torch.nn.functional as F

from ood_det.modeling.losses import (
    EnergyLogistic,
    cfl_loss,
    energy_loss_logistic,
    energy_loss_margin,
    rep_outlier_loss,
)
from ood_det.modeling.scores import (
    ScoreStats,
    combined_id_score,
    compute_score_stats,
    cosine_similarities,
    energy,
    energy_from_class_logits,
    ood_score,
    rep_score,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _unit(x):
    return F.normalize(x, dim=-1)


# ---------------------------------------------------------------- energy
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_energy_matches_direct_formula(temperature):
    logits = torch.randn(7, 5, dtype=torch.float64) * 3
    direct = -temperature * torch.log(torch.exp(logits / temperature).sum(dim=1))
    torch.testing.assert_close(energy(logits, temperature), direct)


def test_energy_finite_for_huge_logits():
    logits = torch.tensor([[1e4, 1e4 - 1.0, -1e4], [-1e4, -1e4, -1e4]], requires_grad=True)
    e = energy(logits)
    assert torch.isfinite(e).all()
    expected = torch.tensor([-1e4 - math.log1p(math.exp(-1.0)), 1e4 - math.log(3.0)])
    torch.testing.assert_close(e, expected)
    e.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_energy_from_class_logits_ignores_background():
    class_logits = torch.randn(6, 4)  # K = 3 foreground + background
    e = energy_from_class_logits(class_logits)
    torch.testing.assert_close(e, energy(class_logits[:, :3]))
    changed = class_logits.clone()
    changed[:, -1] = torch.randn(6) * 100
    torch.testing.assert_close(energy_from_class_logits(changed), e)
    changed[:, 0] += 5.0  # a foreground logit does matter
    assert (energy_from_class_logits(changed) < e).all()


def test_energy_rejects_bad_temperature():
    with pytest.raises(ValueError, match="MODEL.OOD.ENERGY_TEMPERATURE"):
        energy(torch.zeros(2, 3), temperature=0.0)


# ---------------------------------------------------------------- rep score, id score
def test_rep_score_is_max_cosine_and_scale_free():
    z, c = torch.randn(5, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    direct = torch.stack([F.cosine_similarity(z, ck[None], dim=1) for ck in c], dim=1).max(dim=1).values
    torch.testing.assert_close(rep_score(z, c), direct)
    torch.testing.assert_close(rep_score(3 * z, 0.5 * c), direct)
    torch.testing.assert_close(rep_score(c, c), torch.ones(3, dtype=torch.float64))


def test_combined_id_score_modes():
    neg_e, rep = torch.randn(50) * 4 + 10, torch.rand(50)
    stats = compute_score_stats(neg_e, rep)
    e_std = combined_id_score(neg_e, None, stats, mode="energy")
    r_std = combined_id_score(neg_e, rep, stats, mode="representation")
    for s in (e_std, r_std):  # standardized on the calibration data itself
        torch.testing.assert_close(s.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
        torch.testing.assert_close(s.std(), torch.tensor(1.0))
    both = combined_id_score(neg_e, rep, stats, weight=0.5, mode="combined")
    torch.testing.assert_close(both, e_std + 0.5 * r_std)
    torch.testing.assert_close(ood_score(neg_e, rep, stats, 0.5, "combined"), -both)
    # the energy term ranks boxes like -energy (lower energy = more in-distribution)
    order = torch.argsort(neg_e)
    assert (e_std[order].diff() > 0).all()


def test_id_score_without_stats_is_raw_and_stats_round_trip():
    neg_e, rep = torch.randn(4), torch.rand(4)
    torch.testing.assert_close(combined_id_score(neg_e, rep, None, 2.0), neg_e + 2.0 * rep)
    stats = ScoreStats(1.0, 2.0, 0.25, 0.5)
    restored = ScoreStats.from_tensor(stats.to_tensor())
    torch.testing.assert_close(combined_id_score(neg_e, rep, restored),
                               (neg_e - 1.0) / 2.0 + (rep - 0.25) / 0.5)


def test_id_score_bad_mode():
    with pytest.raises(ValueError, match="MODEL.OOD.SCORE"):
        combined_id_score(torch.zeros(2), torch.zeros(2), mode="energy_cfl")
    with pytest.raises(ValueError, match="representation"):
        combined_id_score(torch.zeros(2), None, mode="combined")


# ---------------------------------------------------------------- CFL
def test_cfl_gamma_zero_is_cross_entropy_on_center_similarities():
    z, c = torch.randn(9, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (9,))
    ce = F.cross_entropy((_unit(z) @ _unit(c).t()) / 0.1, y)
    torch.testing.assert_close(cfl_loss(z, y, c, tau=0.1, gamma=0.0), ce)
    assert not torch.allclose(cfl_loss(z, y, c, tau=0.1, gamma=2.0), ce)


def test_cfl_matches_focal_formula():
    z, c = torch.randn(5, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1])
    p = torch.softmax(cosine_similarities(z, c) / 0.2, dim=1)[torch.arange(5), y]
    torch.testing.assert_close(cfl_loss(z, y, c, tau=0.2, gamma=1.5, reduction="none"),
                               -(1 - p) ** 1.5 * p.log())


def test_cfl_gradient_pulls_embedding_and_center_together():
    c = torch.randn(3, 8, dtype=torch.float64)
    z = torch.randn(4, 8, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 2])
    z.requires_grad_(True)
    c.requires_grad_(True)
    cfl_loss(z, y, c, tau=0.1, gamma=2.0).backward()
    with torch.no_grad():
        before = cosine_similarities(z, c)[torch.arange(4), y]
        z_step = cosine_similarities(z - 1e-2 * z.grad, c)[torch.arange(4), y]
        c_step = cosine_similarities(z, c - 1e-2 * c.grad)[torch.arange(4), y]
    assert (z_step > before).all()  # each embedding moves toward its own center
    assert (c_step > before).all()  # each center moves toward its members


def test_cfl_focal_term_down_weights_easy_members():
    c = torch.eye(3, dtype=torch.float64)
    easy = torch.tensor([[1.0, 0.05, 0.0]], dtype=torch.float64)  # near its center 0
    hard = torch.tensor([[1.0, 0.9, 0.0]], dtype=torch.float64)  # between centers 0 and 1
    z, y = torch.cat([easy, hard]), torch.tensor([0, 0])
    focal = cfl_loss(z, y, c, gamma=2.0, reduction="none")
    plain = cfl_loss(z, y, c, gamma=0.0, reduction="none")
    ratio = focal / plain
    assert ratio[0] < 0.1 * ratio[1]  # the easy member keeps much less of its loss
    grads = []
    for gamma in (0.0, 2.0):
        zz = z.clone().requires_grad_(True)
        cfl_loss(zz, y, c, gamma=gamma, reduction="none").sum().backward()
        grads.append(zz.grad.norm(dim=1))
    share = [g[0] / g[1] for g in grads]
    assert share[1] < share[0]  # and a smaller share of the gradient


# ---------------------------------------------------------------- energy losses
def test_margin_energy_loss_values():
    m_in, m_out = -10.0, -4.0
    separated = energy_loss_margin(torch.tensor([-12.0, -15.0]), torch.tensor([-1.0, 0.0]), m_in, m_out)
    assert separated.item() == 0.0
    e_in, e_out = torch.tensor([-8.0, -12.0]), torch.tensor([-6.0, -3.0])
    overlap = energy_loss_margin(e_in, e_out, m_in, m_out)
    torch.testing.assert_close(overlap, torch.tensor((2.0**2 + 0) / 2 + (2.0**2 + 0) / 2))


def test_logistic_energy_loss_prefers_separated_energies():
    module = EnergyLogistic()
    with torch.no_grad():
        module.linear.weight.fill_(1.0)
        module.linear.bias.fill_(-5.0)  # P(in) = sigmoid(-E - 5)
    e_in, e_out = torch.tensor([-9.0, -8.0]), torch.tensor([-2.0])
    loss = energy_loss_logistic(e_in, e_out, module)
    logits = torch.tensor([4.0, 3.0, -3.0])
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 1.0, 0.0])))
    swapped = energy_loss_logistic(e_out.repeat(2), e_in[:1], module)
    assert loss < swapped
    e_in.requires_grad_(True)
    e_out.requires_grad_(True)
    energy_loss_logistic(e_in, e_out, module).backward()
    # a descent step lowers ID energies and raises outlier energies
    assert (e_in.grad > 0).all() and (e_out.grad < 0).all()


# ---------------------------------------------------------------- outlier repulsion
def test_rep_outlier_loss_pushes_outliers_away():
    c = torch.eye(3)
    far = torch.tensor([[-1.0, -1.0, -1.0]])
    assert rep_outlier_loss(far, c, margin=0.2).item() == 0.0
    on_center = torch.tensor([[0.0, 2.0, 0.0]])
    torch.testing.assert_close(rep_outlier_loss(on_center, c, margin=0.2), torch.tensor(0.8**2))
    z = torch.tensor([[1.0, 0.3, 0.1]], requires_grad=True)
    rep_outlier_loss(z, c, margin=0.0).backward()
    with torch.no_grad():
        assert rep_score(z - 0.1 * z.grad, c) < rep_score(z, c)


# ---------------------------------------------------------------- empty inputs
def test_empty_inputs_give_zero_losses_in_graph():
    centers = torch.randn(3, 4, requires_grad=True)
    module = EnergyLogistic()
    empty_z = torch.zeros(0, 4, requires_grad=True)
    empty_e = torch.zeros(0, requires_grad=True)
    some_e = torch.randn(3, requires_grad=True)
    losses = {
        "cfl": cfl_loss(empty_z, torch.zeros(0, dtype=torch.long), centers),
        "rep_out": rep_outlier_loss(empty_z, centers, 0.1),
        "logistic": energy_loss_logistic(some_e, empty_e, module),  # no outliers yet
        "logistic_both": energy_loss_logistic(empty_e, empty_e, module),
        "margin": energy_loss_margin(some_e, empty_e, -5.0, -1.0),
    }
    for name, loss in losses.items():
        assert loss.dim() == 0 and loss.item() == 0.0, name
        assert loss.grad_fn is not None, name
    sum(losses.values()).backward()
    for t in (centers, module.linear.weight, module.linear.bias, some_e):
        assert t.grad is not None and (t.grad == 0).all()
