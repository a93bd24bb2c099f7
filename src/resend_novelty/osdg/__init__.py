"""Open-set domain generalisation (paper, Table 4): a closed-set classifier + a novelty detector.

- :mod:`.probabilities`: class probabilities (checks, ``.csv``/``.npy`` files, MSP);
- :mod:`.classifier`: the reference ERM linear head and out-of-fold source scores;
- :mod:`.fusion`: MSP + novelty fusion, normalisation and the source-based threshold;
- :mod:`.evaluate`: open-set metrics, one target, and a whole benchmark setting.

``UNKNOWN`` is the open-set label of a rejected sample, the one of :mod:`resend_novelty.detectors`.
"""

from ..detectors import UNKNOWN
from .classifier import LinearClassifier, crossfit_source_scores, train_linear_classifier
from .evaluate import (evaluate_osdg, format_osdg_table, open_set_metrics, oscr_metrics,
                       run_osdg_benchmark)
from .fusion import NORMALIZATIONS, OpenSetFusion, default_normalization, source_threshold
from .probabilities import (
    classifier_probabilities,
    load_probabilities,
    msp,
    save_probabilities,
    validate_probabilities,
    validate_scores,
)

__all__ = [
    "UNKNOWN",
    "validate_probabilities",
    "validate_scores",
    "load_probabilities",
    "save_probabilities",
    "classifier_probabilities",
    "msp",
    "LinearClassifier",
    "train_linear_classifier",
    "crossfit_source_scores",
    "NORMALIZATIONS",
    "default_normalization",
    "source_threshold",
    "OpenSetFusion",
    "open_set_metrics",
    "oscr_metrics",
    "evaluate_osdg",
    "run_osdg_benchmark",
    "format_osdg_table",
]
