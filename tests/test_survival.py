"""Discrete-time survival math: bins, the NLL against an independent likelihood, risk ordering."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hipt.survival import bin_edges, hazards, nll_loss, risk_from_logits, survival_curve, to_bins


def test_bin_edges_are_quantiles_of_event_times_only():
    times = np.array([1.0, 2.0, 3.0, 4.0, 100.0, 200.0])
    events = np.array([1, 1, 1, 1, 0, 0])  # censored times must not move the edges
    edges = bin_edges(times, events, n_bins=2)
    assert edges[0] == 0.0 and np.isinf(edges[-1])
    assert edges[1] == pytest.approx(2.5)
    assert to_bins(np.array([0.0, 2.4, 2.5, 3.9, 500.0]), edges).tolist() == [0, 0, 1, 1, 1]


def test_bin_edges_with_ties_stay_strictly_increasing():
    times = np.array([5.0] * 10 + [6.0])
    edges = bin_edges(times, np.ones(11), n_bins=4)
    assert len(edges) == 5
    assert np.all(np.diff(edges) > 0)
    assert to_bins(times, edges).max() <= 3


def _independent_nll(logits: np.ndarray, b: int, e: int) -> float:
    """Likelihood written from the definition: P(T in bin k) = h_k prod_{j<k} (1 - h_j)."""
    h = 1.0 / (1.0 + np.exp(-logits))
    if e == 1:
        return -np.log(h[b] * np.prod(1 - h[:b]))
    return -np.log(np.prod(1 - h[: b + 1]))


def test_nll_matches_the_likelihood_from_its_definition():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4))
    bins = np.array([0, 1, 3, 2, 0, 3])
    events = np.array([1, 0, 1, 0, 0, 1])
    got = float(nll_loss(torch.tensor(logits), torch.tensor(bins), torch.tensor(events)))
    want = np.mean([_independent_nll(logits[i], bins[i], events[i]) for i in range(6)])
    assert got == pytest.approx(want, rel=1e-6)


def test_alpha_adds_weight_to_uncensored_cases_only():
    logits = torch.tensor([[0.3, -0.2, 0.1], [0.5, 0.5, 0.5]])
    bins, events = torch.tensor([1, 2]), torch.tensor([1, 0])
    unc = _independent_nll(logits[0].numpy(), 1, 1)
    cen = _independent_nll(logits[1].numpy(), 2, 0)
    got = float(nll_loss(logits, bins, events, alpha=0.4))
    assert got == pytest.approx(((unc + cen) * 0.6 + 0.4 * unc) / 2, rel=1e-6)


def test_nll_gradient_is_finite_for_saturated_logits():
    logits = torch.tensor([[60.0, -60.0, 60.0, -60.0]], requires_grad=True)
    loss = nll_loss(logits, torch.tensor([3]), torch.tensor([1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_survival_and_risk_values_and_order():
    logits = torch.tensor([[0.0, 0.0], [2.0, 2.0], [-2.0, -2.0]])
    h = hazards(logits)
    s = survival_curve(logits)
    assert torch.allclose(s[0], torch.tensor([0.5, 0.25]))
    assert torch.allclose(s[:, 1], (1 - h[:, 0]) * (1 - h[:, 1]))
    risk = risk_from_logits(logits)
    assert risk[0] == pytest.approx(-0.75)
    # Higher hazards → lower survival → higher risk.
    assert risk[1] > risk[0] > risk[2]


def test_training_on_the_nll_recovers_the_bin_distribution():
    # One shared set of logits fitted to uncensored data: the fitted P(T in bin) equals the
    # empirical bin frequencies (maximum likelihood of a categorical).
    bins = torch.tensor([0] * 10 + [1] * 30 + [2] * 60)
    logits = torch.zeros(3, requires_grad=True)
    opt = torch.optim.LBFGS([logits], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = nll_loss(logits.expand(100, 3), bins, torch.ones(100))
        loss.backward()
        return loss

    opt.step(closure)
    h = torch.sigmoid(logits.detach())
    p = torch.stack([h[0], (1 - h[0]) * h[1], (1 - h[0]) * (1 - h[1]) * h[2]])
    assert torch.allclose(p, torch.tensor([0.1, 0.3, 0.6]), atol=1e-3)


def _true_survival(t, baseline, scale):
    """S(t) = E_z exp(-baseline · e^(scale z) · t), z ~ N(0, 1), by Gauss–Hermite quadrature."""
    z, w = np.polynomial.hermite_e.hermegauss(60)
    w = w / w.sum()
    return np.array([(w * np.exp(-baseline * np.exp(scale * z) * ti)).sum() for ti in t])


def test_synthetic_censoring_is_independent_so_kaplan_meier_finds_the_true_curve():
    """Censoring drawn independently of the event time (random + administrative): Kaplan–Meier
    on the observed data recovers the true survival curve. Censoring at U(0, T_event), as the
    generator did before, depends on T and biases it."""
    from lifelines import KaplanMeierFitter
    from scipy.stats import spearmanr

    from hipt.synthetic_cohort import draw_survival_times

    rng = np.random.default_rng(0)
    lh = 1.0 * rng.standard_normal(20000)
    d = draw_survival_times(rng, lh, baseline_hazard=0.05, censor_fraction=0.3)
    assert abs(spearmanr(d["event_time"], d["censor_time"])[0]) < 0.03
    assert (d["time"] <= 180.0).all() and (d["event"][d["time"] == 180.0] == 0).all()
    assert 0.25 < 1 - d["event"].mean() < 0.5
    grid = np.array([5.0, 10.0, 20.0, 40.0, 80.0])
    truth = _true_survival(grid, 0.05, 1.0)
    km = KaplanMeierFitter().fit(d["time"], d["event"]).survival_function_at_times(grid)
    np.testing.assert_allclose(km.to_numpy(), truth, atol=0.015)
    # The old, dependent scheme: 30% censored at a uniform time before their own event.
    t_event = d["event_time"]
    cens = rng.random(len(t_event)) < 0.3
    old_t = np.where(cens, rng.uniform(0, t_event), t_event)
    old = KaplanMeierFitter().fit(old_t, ~cens).survival_function_at_times(grid)
    assert np.abs(old.to_numpy() - truth).max() > 0.03


def test_synthetic_survival_cohort_keeps_the_truth_out_of_its_csv(tmp_path):
    import pandas as pd

    from hipt.synthetic_cohort import make_survival_cohort

    syn = make_survival_cohort(tmp_path, n_cases=40, regions=(2, 3), n_informative=1, seed=1)
    cohort = pd.read_csv(syn.csv_path)
    truth = pd.read_csv(syn.truth_path)
    assert list(cohort.columns) == ["slide_id", "case_id", "survival_months", "event"]
    assert list(truth.columns) == ["case_id", "log_hazard", "event_time", "censor_time"]
    merged = cohort.merge(truth, on="case_id")
    np.testing.assert_allclose(
        merged["survival_months"],
        np.minimum(merged["event_time"], merged["censor_time"]),
        atol=1e-4,
    )
    assert (merged["event"] == (merged["event_time"] <= merged["censor_time"])).all()
    np.testing.assert_allclose(
        truth["log_hazard"], [syn.log_hazard[c] for c in truth["case_id"]], rtol=1e-12
    )
    assert 0.6 < syn.oracle_c_index() <= 1.0
