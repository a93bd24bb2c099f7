"""Mahalanobis detector (Lee et al., NeurIPS 2018; paper Table 2 baseline), via pytorch-ood.

Class-conditional Gaussians with a tied covariance of the support features: u_k =
-1/2 (f - mu_k)^T Sigma^-1 (f - mu_k), normality = max_k u_k. pytorch-ood is an optional
dependency (``pip install 'resend-novelty[ood]'``); :func:`require_pytorch_ood` names it when
missing.
"""

from __future__ import annotations

import numpy as np
import torch

from .prototype import PrototypeDetector

__all__ = ["MahalanobisDetector", "fit_mahalanobis", "require_pytorch_ood"]


def require_pytorch_ood():
    """The ``pytorch_ood.detector`` module, or an ImportError saying how to install it."""
    try:
        import pytorch_ood.detector as d
    except ImportError as exc:
        raise ImportError(
            "this baseline uses pytorch-ood: pip install 'resend-novelty[ood]' (or pytorch-ood)"
        ) from exc
    return d


def fit_mahalanobis(z: torch.Tensor, y: torch.Tensor):
    """pytorch-ood's Mahalanobis fitted on ``z`` (class index ``y``) in float64 (it allocates
    its statistics in the default dtype; the inverse of a 1280-d scatter matrix is unreliable
    in float32)."""
    ood = require_pytorch_ood()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return ood.Mahalanobis(None).fit_features(z.double(), y)
    finally:
        torch.set_default_dtype(old)


class MahalanobisDetector(PrototypeDetector):
    """Class-conditional Gaussians with a tied covariance (Lee et al. 2018), via pytorch-ood.

    u_k = -1/2 (f - mu_k)^T Sigma^-1 (f - mu_k), normality = max_k u_k. pytorch-ood's
    ``Mahalanobis.fit_features`` estimates mu_k and the precision Sigma^-1 (its Sigma is the
    pooled within-class scatter plus 1e-6 I; computed here in float64).
    """

    name = "mahalanobis"
    fitted_attributes = PrototypeDetector.fitted_attributes + ("precision_",)
    description = ("Mahalanobis distance, class means + tied covariance of the support features "
                   "(pytorch-ood)")

    def fit_features(self, features, labels, domains=None) -> "MahalanobisDetector":
        super().fit_features(features, labels, domains=domains)
        idx = torch.as_tensor(np.searchsorted(self.classes_, np.asarray(labels)))
        self._maha = fit_mahalanobis(self.support_features_.double(), idx)
        self.precision_ = self._maha.precision.double()
        return self

    def similarities_features(self, features, prototypes: torch.Tensor | None = None
                              ) -> torch.Tensor:
        # class means mu = the prototypes (leave-one-out passes its own)
        # (z - mu)^T P (z - mu) = z^T P z - 2 z^T P mu + mu^T P mu: one D x D product per input
        z = torch.as_tensor(features, dtype=torch.float64)
        mu = (self.prototypes_ if prototypes is None else prototypes).double()
        zp = z @ self.precision_
        mp = mu @ self.precision_
        d2 = (zp * z).sum(1, keepdim=True) - 2 * zp @ mu.T + (mp * mu).sum(1)[None, :]
        return (-0.5 * d2).float()
