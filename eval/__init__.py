"""Evaluation: FID / KID (genuine Inception), fd_digits and accuracy (shipped digits classifier), CLIP score.

Heavy pieces (Inception, CLIP, the digits net) load lazily inside :func:`evaluate`, so importing this package is cheap.
"""

from .frechet import feature_stats, frechet_distance, kid, load_stats, load_stats_meta, save_stats
from .harness import METRICS, evaluate, format_table, parse_metrics

__all__ = [
    "METRICS", "evaluate", "feature_stats", "format_table", "frechet_distance", "kid", "load_stats",
    "load_stats_meta", "parse_metrics", "save_stats",
]
