"""Query embedding that stays warm: the index's backbone as one ONNX Runtime session, kept.

:func:`imagerec.embed` starts an ONNX Runtime session and hashes the weights on every call
(about 75 ms of a 100 ms one-image call on the dev VM, measured with cProfile), which is right
for a collection and wasteful for a search service answering one image at a time. This keeps
the session for the life of a :class:`~imagerec.index.SearchIndex` and reuses the library's
batches (:func:`~imagerec.data.iter_batches`: the same decoding and eval transform as
``embed``), so a query's vector equals the one ``embed`` gives (checked by the tests: an indexed
image finds itself with cosine 1).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from .._home import cache_dir
from .._onnx import FeatureModel, export_onnx, onnx_session
from .._version import __version__
from ..checkpoint import feature_model
from ..data import ImageSource, Preprocessing, Skipped, iter_batches


class QueryEncoder:
    """``encoder(source) -> (paths, features, skipped)`` with the index's model, on the CPU."""

    def __init__(self, backbone: str, pp: Preprocessing):
        model = feature_model(backbone, pretrained=True)
        self.pp = pp
        digest = hashlib.sha256(json.dumps([backbone, pp.to_dict(), __version__]).encode())
        for tensor in model.state_dict().values():  # other weights (an upgraded package): another file
            digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        path = cache_dir("onnx") / f"query-{digest.hexdigest()[:32]}.onnx"
        if not path.is_file():
            export_onnx(FeatureModel(model), path, pp.input_size)
        self.session = onnx_session(path, threads=torch.get_num_threads())

    def __call__(self, source: ImageSource, batch_size: int = 64) -> tuple[list[str], np.ndarray, list[Skipped]]:
        workers = 0 if len(source) <= batch_size else None  # no process pool for a few queries
        paths, blocks, skipped = [], [], list(source.skipped)
        for batch in iter_batches(source, self.pp, batch_size=batch_size, workers=workers, prefetch=False):
            skipped += [item for _, item in batch.skipped]
            if len(batch.indices):
                images = np.ascontiguousarray(batch.images.numpy())
                blocks.append(self.session.run(None, {"images": images})[0])
                paths += [source.paths[i] for i in batch.indices.tolist()]
        features = np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32)
        return paths, features, skipped
