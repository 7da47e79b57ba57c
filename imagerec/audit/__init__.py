"""Audit a collection before training or clustering on it: exact and near-duplicates, leaks
across splits, outliers, wrong labels, and bad images (blurry, dark, bright, near-constant,
odd size or aspect ratio, grey in a colour set, unreadable).

:func:`audit` runs the checks on the shared feature stage (:mod:`imagerec.features`) and one
decode pass, and returns an :class:`AuditResult` with one pandas DataFrame per check; with a run
folder it writes ``summary.json``, a CSV (and Parquet) per check, contact sheets and a
self-contained ``report.html``. :func:`audit_index` finds near-duplicates and leaks among the
vectors of an index too large for RAM (the on-disk IVF-PQ kind), in blocks.
"""

from ._api import CHECKS, PIXEL_CHECKS, THRESHOLD_NAMES, AuditResult, audit, write_clean_manifest
from ._duplicates import NEAR_DUPLICATE_K, NEAR_DUPLICATE_THRESHOLD, exact_groups, knn, near_groups
from ._labels import find_label_issues
from ._outliers import find_outliers
from ._quality import QUALITY_THRESHOLDS, quality_issues
from ._scale import IndexAudit, audit_index

__all__ = [
    "CHECKS",
    "NEAR_DUPLICATE_K",
    "NEAR_DUPLICATE_THRESHOLD",
    "PIXEL_CHECKS",
    "QUALITY_THRESHOLDS",
    "THRESHOLD_NAMES",
    "AuditResult",
    "IndexAudit",
    "audit",
    "audit_index",
    "exact_groups",
    "find_label_issues",
    "find_outliers",
    "knn",
    "near_groups",
    "quality_issues",
    "write_clean_manifest",
]
