"""Search a collection by example: a FAISS index of its embeddings, and sharded embedding.

``build_index`` embeds a collection (or takes finished embeddings, or the parts of a sharded
run) and writes INDEX_DIR; ``add_to_index`` appends new images without embedding the old;
``load_index`` opens it and :meth:`SearchIndex.search` embeds query images with the index's own
backbone and preprocessing and returns the nearest images as a DataFrame. Search is exact
(``IndexFlatIP`` on L2-normalised features) up to ``EXACT_MAX`` vectors, IVF beyond. No N x N
matrix is ever built.

Layer: above embedding and clustering (it reuses clustering's automatic backbone rule).
"""

from ._build import AddResult, add_to_index, build_index, choose_backbone
from ._search import SearchIndex, load_index
from ._shard import embed_shard, merge_parts, parse_shard, shard_indices, shard_path
from ._sheet import write_sheets
from ._store import EXACT_MAX, NPROBE

__all__ = [
    "EXACT_MAX",
    "NPROBE",
    "AddResult",
    "SearchIndex",
    "add_to_index",
    "build_index",
    "choose_backbone",
    "embed_shard",
    "load_index",
    "merge_parts",
    "parse_shard",
    "shard_indices",
    "shard_path",
    "write_sheets",
]
