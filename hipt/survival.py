"""Discrete-time survival: time bins, the negative log-likelihood loss, hazards → survival → risk.

The time axis is cut into ``n_bins`` intervals at quantiles of the observed event times; a model
outputs one logit per interval, ``hazard_k = sigmoid(logit_k)`` is the probability of the event in
interval k given survival to its start, ``S_k = prod_{j<=k} (1 - hazard_j)`` and the risk score is
``-sum_k S_k`` (higher risk = shorter expected survival). Training, evaluation and heatmaps all use
these functions so the convention lives in one place.

Examples
--------
>>> import numpy as np, torch
>>> edges = bin_edges(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([1, 1, 1, 1, 0]), n_bins=2)
>>> to_bins(np.array([1.0, 4.0]), edges).tolist()
[0, 1]
>>> logits = torch.zeros(2, 2)
>>> risk_from_logits(logits).tolist()
[-0.75, -0.75]
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def bin_edges(times: np.ndarray, events: np.ndarray, n_bins: int = 4) -> np.ndarray:
    """Interval edges from quantiles of the observed (uncensored) event times.

    Parameters
    ----------
    times : array of float
        Follow-up times (any unit, e.g. months).
    events : array of {0, 1}
        1 when the event was observed at ``times``, 0 when censored.
    n_bins : int
        Number of intervals.

    Returns
    -------
    numpy.ndarray
        ``n_bins + 1`` increasing edges; the first is 0 and the last is ``inf`` so every
        non-negative time falls in a bin. Repeated quantiles (many tied times) are nudged apart so
        the edges stay strictly increasing.
    """
    times = np.asarray(times, dtype=np.float64)
    events = np.asarray(events).astype(bool)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    observed = times[events] if events.any() else times
    if observed.size == 0:
        raise ValueError("cannot make survival bins from an empty set of times")
    inner = (
        np.quantile(observed, np.linspace(0, 1, n_bins + 1)[1:-1]) if n_bins > 1 else np.array([])
    )
    edges = np.concatenate([[0.0], inner, [np.inf]])
    # Ties make equal quantiles; keep the count of bins but make the edges strictly increasing.
    for i in range(1, len(edges) - 1):
        if edges[i] <= edges[i - 1]:
            edges[i] = np.nextafter(edges[i - 1], np.inf)
    return edges


def to_bins(times: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Index of the interval ``[edges[k], edges[k+1])`` that holds each time (int64)."""
    times = np.asarray(times, dtype=np.float64)
    idx = np.searchsorted(edges, times, side="right") - 1
    return np.clip(idx, 0, len(edges) - 2).astype(np.int64)


def nll_loss(
    logits: torch.Tensor,
    bins: torch.Tensor,
    events: torch.Tensor,
    alpha: float = 0.0,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Discrete-time survival negative log-likelihood, averaged over the batch.

    An observed event in bin ``y`` contributes ``-log S_{y-1} - log h_y`` (survived the bins before,
    failed in ``y``); a case censored in bin ``y`` contributes ``-log S_y`` (survived through ``y``).
    ``alpha`` re-weights the uncensored part as in the MCAT-style objective:
    ``loss = (1 - alpha) * (censored + uncensored) + alpha * uncensored``.

    Parameters
    ----------
    logits : Tensor [B, n_bins] (or [n_bins] for one case)
        Hazard logits.
    bins : Tensor [B] of int64
        Interval index of each case's time (:func:`to_bins`).
    events : Tensor [B]
        1 for an observed event, 0 for censored.
    alpha : float
        Weight of the uncensored-only term (0 = plain likelihood).
    eps : float
        Floor inside the logarithms.

    Examples
    --------
    >>> import torch
    >>> round(float(nll_loss(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([1]))), 4)
    0.6931
    """
    if logits.ndim == 1:
        logits = logits.unsqueeze(0)
    bins = bins.reshape(-1).long()
    events = events.reshape(-1).to(logits.dtype)
    # log h and log(1 - h) from logsigmoid: exact for large |logit| where sigmoid saturates.
    log_h = F.logsigmoid(logits)
    log_1mh = F.logsigmoid(-logits)
    log_s = torch.cumsum(log_1mh, dim=1)  # log S_k, k = 0..n-1
    log_s_pad = torch.cat([torch.zeros_like(log_s[:, :1]), log_s], dim=1)  # log S_{k-1}, S_{-1} = 1
    idx = bins.unsqueeze(1)
    before = log_s_pad.gather(1, idx).squeeze(1).clamp_min(np.log(eps))
    in_bin = log_h.gather(1, idx).squeeze(1).clamp_min(np.log(eps))
    through = log_s_pad.gather(1, idx + 1).squeeze(1).clamp_min(np.log(eps))
    uncensored = -events * (before + in_bin)
    censored = -(1.0 - events) * through
    loss = (1.0 - alpha) * (censored + uncensored) + alpha * uncensored
    return loss.mean()


def hazards(logits: torch.Tensor) -> torch.Tensor:
    """Per-interval hazards ``sigmoid(logits)``."""
    return torch.sigmoid(logits)


def survival_curve(logits: torch.Tensor) -> torch.Tensor:
    """``S_k = prod_{j<=k} (1 - h_j)`` along the last dimension."""
    return torch.cumprod(1.0 - hazards(logits), dim=-1)


def risk_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Risk score ``-sum_k S_k``: larger means the event is expected sooner."""
    return -survival_curve(logits).sum(dim=-1)
