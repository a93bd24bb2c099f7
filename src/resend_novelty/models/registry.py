"""Which class implements each relational architecture (``RelationalConfig.arch``).

``"transformer"`` is the relational module of the paper
(:class:`~resend_novelty.models.relational.RelationalModule`); ``"max"``, ``"sum"`` and
``"concat"`` are the Table 5 ablations
(:class:`~resend_novelty.models.aggregation.AggregationModule`). :func:`build_relational` builds
the model of a config, whichever it is; checkpoints and training go through it.
"""

from __future__ import annotations

from .aggregation import AggregationModule
from .config import ARCHS, RelationalConfig, ScoringConfig
from .relational import RelationalModule

__all__ = ["ARCH_CLASSES", "build_relational"]

ARCH_CLASSES: dict[str, type[RelationalModule]] = {
    "transformer": RelationalModule,
    "max": AggregationModule,
    "sum": AggregationModule,
    "concat": AggregationModule,
}
assert tuple(ARCH_CLASSES) == ARCHS


def build_relational(
    config: RelationalConfig, scoring: ScoringConfig | None = None
) -> RelationalModule:
    """The relational model of ``config.arch`` (the transformer of the paper or an ablation),
    with the default scoring ``scoring`` (default: :class:`ScoringConfig`)."""
    return ARCH_CLASSES[config.arch](config, scoring)
