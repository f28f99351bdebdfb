"""Raw scores (energy, msp, rep_score), the OODScorer (id score, calibration, decision) and
losses (CFL, energy, outlier repulsion)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

import ood_det  # noqa: F401  (before any detectron2 import: compat shims)
from ood_det.modeling.losses import (
    EnergyLogistic,
    cfl_loss,
    energy_loss_logistic,
    energy_loss_logistic_of,
    energy_loss_margin,
    rep_outlier_loss,
)
from ood_det.modeling.scorer import OODScorer
from ood_det.modeling.scores import cosine_similarities, energy, energy_and_msp, msp, rep_score, unit_rows


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _unit(x):
    return F.normalize(x, dim=-1)


# ---------------------------------------------------------------- energy, msp
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_energy_matches_direct_formula(temperature):
    logits = torch.randn(7, 5, dtype=torch.float64) * 3
    direct = -temperature * torch.log(torch.exp(logits / temperature).sum(dim=1))
    torch.testing.assert_close(energy(logits, temperature), direct)


def test_weighted_training_energy_is_vos_formula():
    logits = torch.randn(6, 4, dtype=torch.float64)
    w = torch.tensor([0.5, -0.3, 2.0, 1.0], dtype=torch.float64)  # relu clips the negative one
    direct = -torch.log((F.relu(w) * torch.exp(logits)).sum(dim=1))
    torch.testing.assert_close(energy(logits, 1.0, w), direct)
    dead = energy(logits, 1.0, torch.full((4,), -1.0, dtype=torch.float64))
    assert torch.isfinite(dead).all()  # every weight clipped: still finite


def test_energy_computes_in_float32_under_half_precision():
    logits = torch.tensor([[10.0, 10.001, -3.0, 0.0], [10.0, 10.002, -3.0, 0.0]]).half()
    e = energy(logits)
    assert e.dtype == torch.float32
    torch.testing.assert_close(e, energy(logits.float()))


def test_energy_finite_for_huge_logits():
    logits = torch.tensor([[1e4, 1e4 - 1.0, -1e4], [-1e4, -1e4, -1e4]], requires_grad=True)
    e = energy(logits)
    assert torch.isfinite(e).all()
    expected = torch.tensor([-1e4 - math.log1p(math.exp(-1.0)), 1e4 - math.log(3.0)])
    torch.testing.assert_close(e, expected)
    e.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_scorer_energy_and_msp_ignore_background():
    scorer = OODScorer(has_representation=False)
    class_logits = torch.randn(6, 4)  # K = 3 foreground + background
    e, m = scorer.energy(class_logits), scorer.box_scores(class_logits)["msp"]
    torch.testing.assert_close(e, energy(class_logits[:, :3]))
    torch.testing.assert_close(m, torch.softmax(class_logits[:, :3], dim=1).max(dim=1).values)
    changed = class_logits.clone()
    changed[:, -1] = torch.randn(6) * 100
    torch.testing.assert_close(scorer.energy(changed), e)
    changed[:, 0] += 5.0  # a foreground logit does matter
    assert (scorer.energy(changed) < e).all()


def test_msp_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    torch.testing.assert_close(msp(logits), torch.tensor([0.5, 0.75]))


def test_energy_rejects_bad_temperature():
    with pytest.raises(ValueError, match="MODEL.OOD.ENERGY_TEMPERATURE"):
        energy(torch.zeros(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="MODEL.OOD.ENERGY_TEMPERATURE"):
        OODScorer(temperature=-1.0)


# ---------------------------------------------------------------- rep score
def test_rep_score_is_max_cosine_and_scale_free():
    z, c = torch.randn(5, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    direct = torch.stack([F.cosine_similarity(z, ck[None], dim=1) for ck in c], dim=1).max(dim=1).values
    torch.testing.assert_close(rep_score(z, c), direct)
    torch.testing.assert_close(rep_score(3 * z, 0.5 * c), direct)
    torch.testing.assert_close(rep_score(c, c), torch.ones(3, dtype=torch.float64))


# ---------------------------------------------------------------- the scorer
def _fields():
    return {"energy": np.array([-3.0, -1.0, -2.0, -6.0]), "msp": np.array([0.9, 0.5, 0.7, 0.8]),
            "rep_score": np.array([0.2, 0.4, 0.0, 0.6])}


def test_uncalibrated_id_scores_are_raw_and_flag_nothing():
    scorer = OODScorer(rep_weight=2.0)
    f = _fields()
    torch.testing.assert_close(scorer.id_score(f, "energy"), torch.tensor([3.0, 1.0, 2.0, 6.0], dtype=torch.float64))
    torch.testing.assert_close(scorer.id_score(f, "msp"), torch.tensor(f["msp"]))
    torch.testing.assert_close(scorer.id_score(f), torch.tensor([3.4, 1.8, 2.0, 7.2], dtype=torch.float64))
    torch.testing.assert_close(scorer.ood_score(f), -scorer.id_score(f))
    assert not scorer.is_ood(scorer.id_score(f)).any()


def test_fit_by_hand():
    """Calibration statistics and the 95% threshold, computed by hand on 20 boxes."""
    neg_e = np.arange(1.0, 21.0)  # -energy = 1..20: mean 10.5, unbiased std sqrt(35)
    rep = np.linspace(0.0, 0.95, 20)
    fields = {"energy": -neg_e, "msp": np.full(20, 0.5), "rep_score": rep}
    scorer = OODScorer(score="energy", rep_weight=0.5)
    summary = scorer.fit(fields, conf_threshold=0.3)
    assert summary["neg_energy_mean"] == pytest.approx(10.5)
    assert summary["neg_energy_std"] == pytest.approx(math.sqrt(35.0))
    assert summary["rep_score_mean"] == pytest.approx(0.475)
    # 95% of 20 boxes = 19 kept: the threshold is the 2nd lowest id score, (2 - 10.5) / sqrt(35).
    assert summary["id_threshold"] == pytest.approx((2.0 - 10.5) / math.sqrt(35.0))
    assert summary["conf_threshold"] == pytest.approx(0.3) and summary["calibrated"]
    flagged = scorer.is_ood(scorer.id_score(fields))
    assert flagged.tolist() == [True] + [False] * 19
    msp_std = summary["msp_std"]
    assert msp_std == 0.0  # a constant score: standardized with std clamped, no division by 0
    assert torch.isfinite(scorer.id_score(fields, "msp")).all()


def test_combined_score_after_fit_is_the_weighted_sum_of_standardized_terms():
    rng = np.random.default_rng(0)
    fields = {"energy": rng.normal(-10, 3, 50), "msp": rng.uniform(0.3, 1, 50), "rep_score": rng.uniform(0, 1, 50)}
    scorer = OODScorer(score="combined", rep_weight=0.5)
    scorer.fit(fields, 0.0)
    ne, r = -fields["energy"], fields["rep_score"]
    want = (ne - ne.mean()) / ne.std(ddof=1) + 0.5 * (r - r.mean()) / r.std(ddof=1)
    np.testing.assert_allclose(scorer.id_score(fields).numpy(), want, rtol=1e-6)
    # kept share: exactly 48 of 50 boxes (ceil(0.95 * 50) = 48) are at or above the threshold
    assert int((scorer.id_score(fields) >= scorer.id_threshold.double()).sum()) == 48


def test_scores_follow_the_input_device_and_dtype():
    scorer = OODScorer()
    scorer.fit(_fields(), 0.1)
    half = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in _fields().items()}
    out = scorer.id_score(half)
    assert out.dtype == torch.float32 and out.device == half["energy"].device


@pytest.mark.parametrize("score, has_rep, message", [
    ("bogus", True, "MODEL.OOD.SCORE must be auto or one of"),
    ("combined", False, "needs class centers"),
    ("representation", False, "needs class centers"),
])
def test_bad_score_names_the_key(score, has_rep, message):
    with pytest.raises(ValueError, match=message):
        OODScorer(score=score, has_representation=has_rep)


def test_auto_score_and_available_scores():
    assert OODScorer(has_representation=True).score_name == "combined"
    without = OODScorer(has_representation=False)
    assert without.score_name == "energy" and without.available_scores == ("energy", "msp")
    with pytest.raises(ValueError, match="not available"):
        without.id_score(_fields(), "combined")


def test_older_calibration_state_loads():
    """A checkpoint written before the scorer: (4,) score_stats, id threshold 0 when uncalibrated."""
    scorer = OODScorer(rep_weight=0.5)
    old = {"calibrated": torch.tensor(True), "score_stats": torch.tensor([1.0, 2.0, 0.25, 0.5]),
           "id_threshold": torch.tensor(-0.7), "conf_threshold": torch.tensor(0.4)}
    result = scorer.load_state_dict(old, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(scorer.stats, torch.tensor([[1.0, 2.0], [0.0, 1.0], [0.25, 0.5]], dtype=torch.float64))
    assert float(scorer.rep_weight) == 0.5 and float(scorer.id_threshold) == pytest.approx(-0.7)
    fresh = OODScorer()
    fresh.load_state_dict({"calibrated": torch.tensor(False), "score_stats": torch.tensor([0.0, 1.0, 0.0, 1.0]),
                           "id_threshold": torch.tensor(0.0), "conf_threshold": torch.tensor(0.0)})
    assert not fresh.is_ood(torch.tensor([-5.0])).any()  # uncalibrated: nothing is flagged


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


def test_cfl_gradient_matches_finite_differences():
    """The focal factor (1 - p_y)^gamma depends on z and c: its derivative belongs to the gradient."""
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2, 1, 2])
    assert torch.autograd.gradcheck(lambda z, c: cfl_loss(z, y, c, tau=0.3, gamma=2.0), (z, c))


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


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_energy_and_msp_together_are_torch_logsumexp_and_softmax(temperature):
    logits = torch.randn(40, 6, dtype=torch.float64) * 8
    e, m = energy_and_msp(logits, temperature)
    torch.testing.assert_close(e, -temperature * torch.logsumexp(logits / temperature, dim=1))
    torch.testing.assert_close(m, torch.softmax(logits, dim=1).max(dim=1).values)
    torch.testing.assert_close(e, energy(logits, temperature), rtol=0, atol=0)
    torch.testing.assert_close(m, msp(logits), rtol=0, atol=0)


def test_energy_gradient_is_minus_the_softmax():
    logits = (torch.randn(7, 5, dtype=torch.float64) * 4).requires_grad_()
    energy(logits, 2.0).sum().backward()
    torch.testing.assert_close(logits.grad, -torch.softmax(logits.detach() / 2.0, dim=1))
    w = torch.rand(5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, w: energy(x, 1.5, w), (x, w))


def test_unit_rows_are_f_normalize_with_its_gradient():
    x = torch.randn(9, 5, dtype=torch.float64) * 3
    x[4] = 0.0  # a row the clamp at eps holds
    x[6] = 1e-14
    x.requires_grad_()
    y = unit_rows(x)
    torch.testing.assert_close(y, F.normalize(x, dim=-1), rtol=0, atol=0)
    grad = torch.randn(9, 5, dtype=torch.float64)
    (mine,) = torch.autograd.grad(y, x, grad)
    (theirs,) = torch.autograd.grad(F.normalize(x, dim=-1), x, grad)
    torch.testing.assert_close(mine, theirs)
    torch.autograd.gradcheck(unit_rows, (torch.randn(4, 3, dtype=torch.float64, requires_grad=True),))
    # float16 in, under autocast on the CPU too: values of F.normalize, the gradient in the input's dtype
    h = torch.randn(3, 8).half().requires_grad_()
    unit_rows(h).sum().backward()
    assert h.grad.dtype == torch.float16
    with torch.no_grad():
        assert unit_rows(x).grad_fn is None and torch.equal(unit_rows(x), F.normalize(x, dim=-1))


def test_logistic_energy_loss_is_binary_cross_entropy_values_and_gradients():
    module = EnergyLogistic()
    with torch.no_grad():
        module.linear.weight.fill_(3.0)
        module.linear.bias.fill_(1.0)
    energies = (torch.randn(30, dtype=torch.float64) * 12).requires_grad_()  # logits past softplus's threshold too
    loss = energy_loss_logistic_of(-energies.float(), 11, module)
    logits = module(-energies.float())
    targets = torch.cat([torch.ones(11), torch.zeros(19)])
    want = F.binary_cross_entropy_with_logits(logits, targets)
    torch.testing.assert_close(loss, want)
    (mine,) = torch.autograd.grad(loss, energies)
    (theirs,) = torch.autograd.grad(want, energies)
    torch.testing.assert_close(mine, theirs)
    e = energies.float()
    torch.testing.assert_close(energy_loss_logistic(e[:11], e[11:], module), loss)


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


def test_calibration_keeps_float64_through_dtype_casts():
    scorer = OODScorer()
    scorer.fit(_fields(), 0.123456789)
    before = {k: v.clone() for k, v in scorer.state_dict().items()}
    scorer.half().float()
    for key, value in scorer.state_dict().items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key


def test_fitted_weight_follows_the_term_that_separates_outliers():
    rng = np.random.default_rng(1)
    n = 400
    ids = {"energy": -rng.normal(5, 1, n), "msp": rng.uniform(0.5, 1, n), "rep_score": rng.normal(0.8, 0.1, n)}

    def outliers(energy_shift, rep_shift):
        return {"energy": -rng.normal(5 - energy_shift, 1, n), "msp": rng.uniform(0.5, 1, n),
                "rep_score": rng.normal(0.8 - rep_shift, 0.1, n)}

    weights = {}
    for name, shift in {"rep": (0.0, 0.3), "energy": (3.0, 0.0), "both": (1.0, 0.1)}.items():
        scorer = OODScorer(rep_weight=1.0, fit_rep_weight=True)
        scorer.fit(ids, 0.0, outlier_fields=outliers(*shift))
        weights[name] = float(scorer.rep_weight)
    assert weights["rep"] > 3.0  # only the representation separates: it gets the weight
    assert weights["energy"] < 0.3  # only the energy separates
    assert 0.5 < weights["both"] < 2.0  # equally separating in standardized units: w near 1
    # The threshold is computed with the fitted weight: it keeps 95% of the validation boxes.
    assert float((scorer.id_score(ids) >= scorer.id_threshold).double().mean()) >= 0.95
    fixed = OODScorer(rep_weight=0.7)
    fixed.fit(ids, 0.0, outlier_fields=outliers(0.0, 0.3))
    assert float(fixed.rep_weight) == pytest.approx(0.7)  # not asked to fit: the configured weight stays


def test_fitted_weight_balances_unequal_counts_of_boxes_and_outliers():
    """2000 validation boxes against 100 virtual outliers of another spread (so that weighting the
    two classes moves the slopes, not only the bias): w is the ratio of the coefficients of a
    class-balanced logistic regression on the standardized terms, here scikit-learn's."""
    rng = np.random.default_rng(0)
    n_id, n_out = 2000, 100
    ids = {"energy": -rng.normal(5, 1, n_id), "msp": rng.uniform(0.5, 1, n_id), "rep_score": rng.normal(0.8, 0.1, n_id)}
    outliers = {"energy": -rng.normal(3.5, 2, n_out), "msp": rng.uniform(0.5, 1, n_out),
                "rep_score": rng.normal(0.7, 0.3, n_out)}
    scorer = OODScorer(rep_weight=1.0, fit_rep_weight=True)
    scorer.fit(ids, 0.0, outlier_fields=outliers)

    def standardized(f):
        ne, id_ne = -f["energy"], -ids["energy"]
        return np.c_[(ne - id_ne.mean()) / id_ne.std(ddof=1),
                     (f["rep_score"] - ids["rep_score"].mean()) / ids["rep_score"].std(ddof=1)]

    x, y = np.r_[standardized(ids), standardized(outliers)], np.r_[np.ones(n_id), np.zeros(n_out)]

    def weight(class_weight):
        coef = LogisticRegression(class_weight=class_weight, C=1e6, tol=1e-10, max_iter=10000).fit(x, y).coef_[0]
        return coef[1] / coef[0]

    balanced = weight("balanced")
    # Each class weighted by the other's count instead: a clearly different weight on these data.
    assert abs(weight({1.0: 1.0, 0.0: n_out / n_id}) - balanced) > 0.5 * balanced
    assert float(scorer.rep_weight) == pytest.approx(balanced, rel=1e-3)


def test_positive_slope_logistic_only_asks_for_higher_outlier_energy():
    free, positive = EnergyLogistic(), EnergyLogistic(positive_slope=True)
    for module in (free, positive):
        with torch.no_grad():
            module.linear.weight.fill_(-2.0)
            module.linear.bias.fill_(0.0)
    x = torch.tensor([1.0, -3.0])
    torch.testing.assert_close(free(x), -2.0 * x)
    torch.testing.assert_close(positive(x), F.softplus(torch.tensor(-2.0)) * x)  # slope softplus(-2) > 0
    e_in, e_out = torch.tensor([-1.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
    energy_loss_logistic(e_in, e_out, positive).backward()
    assert e_in.grad > 0 and e_out.grad < 0  # lower the ID energy, raise the outlier's


def test_two_class_logistic_is_vos_cross_entropy_and_the_binary_model():
    """VOS's Linear(1, 2) + cross-entropy equals BCE on the logit difference: same loss and gradients as
    the two_class form, and the same loss as the binary form with the matched slope and bias."""
    two = EnergyLogistic(form="two_class")
    with torch.no_grad():
        two.linear.weight.copy_(torch.tensor([[-0.4], [0.9]]))
        two.linear.bias.copy_(torch.tensor([0.3, -1.2]))
    e_in, e_out = torch.tensor([-6.0, -4.5, -5.2]), torch.tensor([-1.0, -2.5])
    vos = torch.nn.Linear(1, 2)
    vos.load_state_dict(two.linear.state_dict())
    x = -torch.cat([e_in, e_out])
    want = F.cross_entropy(vos(x[:, None]), torch.tensor([1, 1, 1, 0, 0]))
    got = energy_loss_logistic(e_in, e_out, two)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(two.linear.weight.grad, vos.weight.grad)
    torch.testing.assert_close(two.linear.bias.grad, vos.bias.grad)
    assert two.slope == pytest.approx(1.3)
    binary = EnergyLogistic()
    with torch.no_grad():
        binary.linear.weight.fill_(1.3)
        binary.linear.bias.fill_(-1.5)
    torch.testing.assert_close(energy_loss_logistic(e_in, e_out, binary), want)
    assert binary.slope == pytest.approx(1.3)
    positive = EnergyLogistic(positive_slope=True, form="two_class")
    with torch.no_grad():
        positive.linear.weight.copy_(torch.tensor([[0.5], [-1.5]]))
    assert positive.slope == pytest.approx(float(F.softplus(torch.tensor(-2.0))))
    with pytest.raises(ValueError, match=r"MODEL\.OOD\.ENERGY_LOGISTIC"):
        EnergyLogistic(form="softmax")


def test_cast_calibration_follows_every_change_of_the_buffers():
    """The scorer casts its float64 calibration once per change; each way of changing it is seen."""
    fields = _fields()
    ids32 = torch.tensor([-2.0, 0.1, 0.4, 5.0])
    scorer = OODScorer()

    fields32 = {k: torch.tensor(v, dtype=torch.float32) for k, v in fields.items()}

    def check():  # against a scorer of the same state that never cast anything; float32 first and last,
        fresh = OODScorer()  # so that a stale float32 cast of the previous check would be used
        fresh.load_state_dict(scorer.state_dict())
        assert torch.equal(scorer.id_score(fields32), fresh.id_score(fields32))
        assert torch.equal(scorer.is_ood(ids32), fresh.is_ood(ids32))
        assert torch.equal(scorer.id_score(fields), fresh.id_score(fields))
        return scorer.is_ood(ids32)

    assert not check().any()  # uncalibrated
    scorer.fit(fields, 0.3)
    check()
    with torch.no_grad():
        scorer.rep_weight.fill_(2.5)
        scorer.stats[0].copy_(torch.tensor([1.0, 3.0], dtype=torch.float64))
        scorer.id_threshold.fill_(0.3)
    assert check().tolist() == [True, True, False, False]
    scorer.load_state_dict(OODScorer().state_dict())  # uncalibrated again
    assert not check().any()
