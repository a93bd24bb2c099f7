"""Label-free feature transforms composed into detectors: per-domain normalisation and
test-time prototype refinement."""

from .domain_norm import (MODES, STD_FLOOR, DomainNormalizer, as_mode, domain_statistics,
                          mean_direction, normalize, normalize_by_domain, shift_gap)
from .refinement import REFINE_FRACTION, REFINE_KEEP, PrototypeRefiner

__all__ = ["MODES", "STD_FLOOR", "DomainNormalizer", "as_mode", "domain_statistics", "normalize",
           "normalize_by_domain", "mean_direction", "shift_gap", "REFINE_FRACTION", "REFINE_KEEP", "PrototypeRefiner"]
