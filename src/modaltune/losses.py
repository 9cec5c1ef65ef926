"""Losses: ModalTune's text-KL (method 3.2) and the supervised baselines' CE / discrete-time survival NLL."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def text_kl_loss(embeddings: torch.Tensor, targets: torch.Tensor, weight: float = 10.0, tau: float = 1.0):
    """KL(p_target || q_model) over the E feature dims of every (patient, token), as method 3.2.

    Rows of both tensors (B, K, E) are L2-normalised, then softmaxed over E with temperature ``tau``.
    The KL is summed over the K tokens and E dims (the reference's ``KLDivLoss(reduction="sum")`` with
    batch 1), scaled by ``weight * tau**2`` and averaged over the B patients of the batch.
    """
    if embeddings.shape != targets.shape or embeddings.ndim != 3:
        raise ValueError(f"text_kl_loss: need equal (B, K, E) shapes, got {tuple(embeddings.shape)} "
                         f"and {tuple(targets.shape)}")
    z = F.normalize(embeddings.float(), dim=-1)
    p = F.normalize(targets.float(), dim=-1)
    log_q = F.log_softmax(z / tau, dim=-1)
    log_p = F.log_softmax(p / tau, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=(1, 2))
    return weight * tau**2 * kl.mean()


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over patients with a subtype label (label -1 = not in the task is ignored)."""
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=-1)


def discrete_survival_nll(hazard_logits: torch.Tensor, bin_idx: torch.Tensor, event: torch.Tensor,
                          alpha: float = 0.0, eps: float = 1e-7) -> torch.Tensor:
    """Discrete-time survival negative log-likelihood (Zadeh & Schmid 2021; SurvPath's NLLSurvLoss).

    h_j = sigmoid(logit_j) is the hazard of bin j, S_j = prod_{i<=j} (1 - h_i). A death in bin y
    contributes -log S_{y-1} - log h_y; a patient censored in bin y contributes -log S_y. ``alpha``
    up-weights the uncensored term: loss = (1 - alpha) * (cens + uncens) + alpha * uncens.
    Patients with bin -1 (no follow-up) are dropped; the mean is over the remaining patients.
    """
    keep = (bin_idx >= 0) & torch.isfinite(event)
    if not bool(keep.any()):
        return hazard_logits.sum() * 0.0
    h = torch.sigmoid(hazard_logits[keep].float()).clamp(eps, 1 - eps)
    y = bin_idx[keep].long().unsqueeze(1)
    c = 1.0 - event[keep].float().unsqueeze(1)  # censorship indicator
    s = torch.cumprod(1 - h, dim=1)
    s_pad = torch.cat([torch.ones_like(s[:, :1]), s], dim=1)  # S_{-1} = 1
    uncens = -(1 - c) * (torch.log(s_pad.gather(1, y).clamp_min(eps)) + torch.log(h.gather(1, y)))
    cens = -c * torch.log(s_pad.gather(1, y + 1).clamp_min(eps))
    loss = (1 - alpha) * (cens + uncens) + alpha * uncens
    return loss.mean()


def risk_from_hazards(hazard_logits: torch.Tensor) -> torch.Tensor:
    """Risk score = -sum_j S_j (higher = earlier death), SurvPath's choice for the C-index."""
    s = torch.cumprod(1 - torch.sigmoid(hazard_logits.float()), dim=1)
    return -s.sum(dim=1)


__all__ = ["classification_loss", "discrete_survival_nll", "risk_from_hazards", "text_kl_loss"]
