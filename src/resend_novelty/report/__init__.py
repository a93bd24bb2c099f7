"""Reports: novelty detection on a practitioner's folders, result files, benchmark helpers.

- :mod:`.folders`: the support folder (class sub-folders) and the test folder;
- :mod:`.result`: :class:`ScoreResult` and :func:`score_folders` (data -> scores);
- :mod:`.stream`: scoring with a fitted detector, a folder or a stream (:func:`watch`);
- :mod:`.plots`: PNG plots of a result; :mod:`.writer`: the report folder (:func:`write_report`);
- :mod:`.files`: atomic JSON writing;
- :mod:`.markdown`: named sections of BENCHMARKS.md;
- :mod:`.profiling`: peak memory, threads, GEMM rate and arithmetic counts for speed benchmarks;
- :mod:`.exported_features`: features exported by ``resend features --export`` looked up by path.
"""

from .exported_features import features_file_lookup
from .files import write_json
from .folders import TestImages, scan_support, scan_test
from .markdown import section_parts, update_section, write_section_parts
from .plots import plot_detection_rates, plot_histogram, plot_roc
from .profiling import (
    PeakMemory,
    batched_macs,
    current_rss,
    gemm_gflops,
    loop_macs,
    sync_device,
    torch_threads,
)
from .result import UNKNOWN_NAME, ScoreResult, score_folders, score_test_set
from .stream import csv_header, score_fitted, watch
from .validation import validation_threshold
from .writer import write_report

__all__ = [
    "UNKNOWN_NAME",
    "TestImages",
    "ScoreResult",
    "scan_support",
    "scan_test",
    "score_folders",
    "score_test_set",
    "score_fitted",
    "watch",
    "csv_header",
    "validation_threshold",
    "write_report",
    "plot_histogram",
    "plot_roc",
    "plot_detection_rates",
    "write_json",
    "update_section",
    "section_parts",
    "write_section_parts",
    "current_rss",
    "PeakMemory",
    "torch_threads",
    "sync_device",
    "gemm_gflops",
    "loop_macs",
    "batched_macs",
    "features_file_lookup",
]
