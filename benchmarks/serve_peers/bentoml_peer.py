"""The BentoML peer of ``benchmarks/serve_load.py``: the same .onnx, BentoML's adaptive batching.

What a user writes with BentoML (1.4) for an image classifier, following its documentation
for adaptive batching (``@bentoml.api(batchable=True, max_batch_size=..., max_latency_ms=...)``,
a list of PIL images in, a list of answers out). The model is imagerec's exported ONNX file, run
by ONNX Runtime through ``imagerec.runtime`` (the same session options and numpy preprocessing
as ``imagerec serve``), so only the serving layer differs. Configured by environment variables,
since ``bentoml serve`` imports the module itself:

    PEER_MODEL=MODEL.onnx PEER_THREADS=1 PEER_MAX_BATCH=32 \\
        bentoml serve bentoml_peer:Classifier --working-dir benchmarks/serve_peers --host 127.0.0.1 --port 8002
"""

from __future__ import annotations

import os

import bentoml
import numpy as np
from PIL.Image import Image

import imagerec.runtime as rt


# one worker (one core), no access log line per request (imagerec and LitServe log none either)
@bentoml.service(workers=1, traffic={"timeout": 30}, logging={"access": {"enabled": False}})
class Classifier:
    def __init__(self):
        self.model = rt.load(os.environ["PEER_MODEL"], threads=int(os.environ.get("PEER_THREADS", "1")))

    @bentoml.api(batchable=True, max_batch_size=int(os.environ.get("PEER_MAX_BATCH", "32")), max_latency_ms=30_000)
    def predict(self, file: list[Image]) -> list[dict]:
        batch = np.stack([rt.preprocess(image.convert("RGB"), self.model.preprocessing) for image in file])
        logits = self.model.logits(batch) / self.model.temperature
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        proba = exp / exp.sum(axis=1, keepdims=True)
        return [{"class": self.model.classes[int(p.argmax())], "probability": float(p.max())} for p in proba]
