"""Evaluation of frozen features: k-NN, feature stores and caches, SPARO slot analysis."""

from dino_sparo.evaluation.features import (
    FeatureStore,
    cached_features,
    extract_features,
    feature_cache_key,
    feature_cache_path,
    file_fingerprint,
)
from dino_sparo.evaluation.knn import knn_classify, knn_evaluate, knn_search, knn_vote, resolve_backend
from dino_sparo.evaluation.slots import (
    SelectedSlots,
    SlotSelection,
    greedy_slot_selection,
    per_slot_knn,
    plot_per_slot_accuracy,
    select_slot_features,
    stratified_split,
)

__all__ = [
    "FeatureStore",
    "SelectedSlots",
    "SlotSelection",
    "cached_features",
    "extract_features",
    "feature_cache_key",
    "feature_cache_path",
    "file_fingerprint",
    "greedy_slot_selection",
    "knn_classify",
    "knn_evaluate",
    "knn_search",
    "knn_vote",
    "per_slot_knn",
    "plot_per_slot_accuracy",
    "resolve_backend",
    "select_slot_features",
    "stratified_split",
]
