"""The LitServe peer of ``benchmarks/serve_load.py``: the same .onnx, LitServe's batching on.

What a user writes with LitServe (0.2.x) for an image classifier, following its documentation
for batching (``LitAPI(max_batch_size=..., batch_timeout=...)``, ``batch``/``unbatch``) and
its faster queue (``LitServer(fast_queue=True)``, ZeroMQ). The model is imagerec's exported
ONNX file, run by ONNX Runtime through ``imagerec.runtime`` (the same session options and the
same numpy preprocessing as ``imagerec serve``), so only the serving layer differs.

    python benchmarks/serve_peers/litserve_peer.py MODEL.onnx --port 8001 [--max-batch-size 32 --batch-timeout-ms 5]
"""

from __future__ import annotations

import argparse
import io

import litserve as ls
import numpy as np
from PIL import Image

import imagerec.runtime as rt


class Classifier(ls.LitAPI):
    def __init__(self, model_path: str, threads: int, **kwargs):
        super().__init__(**kwargs)
        self.model_path, self.threads = model_path, threads

    def setup(self, device):
        self.model = rt.load(self.model_path, threads=self.threads)

    def decode_request(self, request):
        upload = request["file"]  # a multipart file, as curl -F file=@x.jpg sends it
        image = Image.open(io.BytesIO(upload.file.read())).convert("RGB")
        return rt.preprocess(image, self.model.preprocessing)

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, batch):
        single = batch.ndim == 3  # with max_batch_size=1 LitServe calls neither batch nor unbatch
        logits = self.model.logits(batch[None] if single else batch) / self.model.temperature
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        proba = exp / exp.sum(axis=1, keepdims=True)
        return proba[0] if single else proba

    def unbatch(self, output):
        return list(output)

    def encode_response(self, proba):
        best = int(proba.argmax())
        return {"class": self.model.classes[best], "probability": float(proba[best])}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0)
    args = parser.parse_args()
    api = Classifier(args.model, args.threads, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, fast_queue=True, timeout=30)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning", generate_client_file=False)
