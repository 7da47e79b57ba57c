"""Embedding past one machine: a Ray cluster embeds a collection into content-keyed parts.

``embed_on_ray`` splits the collection (a folder, a CSV manifest of paths...) into parts of
``part_size`` images, runs ``ray.data`` ``map_batches`` over them with a pool of embedding
actors (CPU, or ``num_gpus`` each), and each actor writes its finished part straight to the
output folder. A part's file name carries a digest of what it was made from (the model's
weights and preprocessing, the part's paths and their files' identities), so a job that was
killed and is run again embeds only the parts that are missing or whose files changed. The
parts are ordinary embeddings files with a ``shard`` record: ``imagerec index --parts OUT/part-*.npz``
takes them and checks that none is missing.

Ray is optional (``pip install imagerec[ray]``) and imported only here, only when called.

Layer: above embedding and index (it writes the parts that index merges).
"""

from ._ray import EmbedOnRay, embed_on_ray, plan_parts

__all__ = ["EmbedOnRay", "embed_on_ray", "plan_parts"]
