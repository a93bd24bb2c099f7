"""A threshold in the target domain from the unlabelled test scores (:func:`test_mode_threshold`).

The support leave-one-out threshold (:meth:`PrototypeDetector.calibrate`) asks for a recall of
the known classes *on the support domain*; when the test images come from another domain
(support photos, test paintings) their normality is lower overall and far fewer than the asked
fraction of known images is accepted. The test images themselves, scored together and without
labels, show where the known mode of the target domain lies:

1. a two-component Gaussian mixture (scikit-learn, ``random_state`` fixed) is fitted to the test
   normality scores; the component with the larger mean is taken as the known mode;
2. each test image weighs in by its posterior probability of belonging to that mode;
3. the threshold is the weighted ``(1 - tpr)`` quantile of the scores: the known mode keeps a
   fraction ``tpr`` of its (posterior) mass above it.

Transductive, like the per-domain normalisation: it assumes the unknown images do not form the
upper mode, and it needs enough test images (``min_images``) for two modes to be estimated.
"""

from __future__ import annotations

import numpy as np
from sklearn.mixture import GaussianMixture

__all__ = ["test_mode_threshold", "THRESHOLD_SOURCES"]

THRESHOLD_SOURCES = ("support", "test", "validation")


def test_mode_threshold(scores, tpr: float = 0.95, seed: int = 0,
                        min_images: int = 20) -> tuple[float, dict]:
    """``(threshold, rule)`` from the unlabelled test normality ``scores`` (see module doc).

    ``rule`` records how it was chosen: the mixture's means, standard deviations and weights,
    the known component's share of the images, ``tpr`` and the number of images.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not 0.0 < float(tpr) <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    if not np.isfinite(s).all():
        raise ValueError("the test scores hold NaN or infinite values")
    if len(s) < min_images:
        raise ValueError(f"a threshold from the test scores needs at least {min_images} test "
                         f"images scored together, got {len(s)}")
    gm = GaussianMixture(2, random_state=seed, n_init=3, reg_covar=1e-6 + 1e-6 * s.var())
    gm.fit(s[:, None])
    means = gm.means_.ravel()
    known = int(np.argmax(means))
    weight = gm.predict_proba(s[:, None])[:, known]
    order = np.argsort(s)
    cum = np.cumsum(weight[order]) / weight.sum()  # known-mode mass at or below each score
    # the smallest score t whose known-mode mass strictly below it is <= 1 - tpr
    below = np.concatenate([[0.0], cum[:-1]])
    ok = np.flatnonzero(below <= 1.0 - float(tpr) + 1e-12)
    threshold = float(s[order][ok[-1]])
    rule = {
        "source": "test scores, known mode of a 2-component Gaussian mixture",
        "tpr": float(tpr),
        "n_images": int(len(s)),
        "means": [float(m) for m in means],
        "stds": [float(v) for v in np.sqrt(gm.covariances_.ravel())],
        "weights": [float(w) for w in gm.weights_],
        "known_component": known,
        "known_share": float(weight.mean()),
        "seed": int(seed),
    }
    return threshold, rule
