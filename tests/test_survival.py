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
