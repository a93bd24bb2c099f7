"""OSDG fusion: the default score normalisation follows the detector's normality."""

from __future__ import annotations

from resend_novelty.models import RelationalModule
from resend_novelty.osdg import default_normalization


def test_osdg_auto_normalisation_follows_the_normality():
    soft = RelationalModule(feature_dim=6, dim=8, heads=2, depth=1)
    maxl = RelationalModule(feature_dim=6, dim=8, heads=2, depth=1, normality="max-logit")
    assert default_normalization("resend", soft) == "none"
    assert default_normalization("resend", maxl) == "zscore"
    assert default_normalization("cosine") == "zscore"
