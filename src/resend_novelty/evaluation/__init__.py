"""Evaluation: novelty metrics, the paper's benchmark settings (registry, list files, runner),
the generalisation suite used for model selection (:mod:`.suite`) and the synthetic
domain-shift proxy it replaced."""

from .lists import load_setting_lists, missing_list_files, resolve_data_root, setting_summary
from .metrics import (aupr_in, aupr_out, auroc, closed_set_accuracy, fpr95, fpr_at_tpr, h_score,
                      novelty_report, oscr)
from .proxy import (PROXY_DOMAINS, ProxySet, evaluate_proxy, load_proxy_set, proxy_episodes,
                    proxy_records)
from .runner import evaluate_detector, format_table, run_benchmark, setting_paths
from .settings import SETTINGS, Setting, Target, get_setting, register_setting
from .suite import (PACS_DOMAINS, TINY_STYLES, Episode, FeaturePool, cap_per_class,
                    flowers_records, intra_episodes, list_episodes, load_pools, official_lists,
                    score_episodes, subsample_unknown_share, tiny_records)

__all__ = [
    "load_setting_lists", "missing_list_files", "resolve_data_root", "setting_summary",
    "aupr_in", "aupr_out", "auroc", "closed_set_accuracy", "fpr95", "fpr_at_tpr", "h_score",
    "novelty_report", "oscr",
    "PROXY_DOMAINS", "ProxySet", "evaluate_proxy", "load_proxy_set", "proxy_episodes",
    "proxy_records",
    "evaluate_detector", "format_table", "run_benchmark", "setting_paths",
    "SETTINGS", "Setting", "Target", "get_setting", "register_setting",
    "PACS_DOMAINS", "TINY_STYLES", "Episode", "FeaturePool", "cap_per_class", "flowers_records",
    "intra_episodes", "list_episodes", "load_pools", "official_lists", "score_episodes",
    "subsample_unknown_share", "tiny_records",
]
