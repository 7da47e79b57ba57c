"""The hand-written peer of the first ``benchmarks/serve_load.py`` (docs/BENCHMARKS.md, "Serving
over HTTP"; the script now measures LitServe and BentoML instead): the endpoint a user writes by hand.

FastAPI, the PyTorch model, one forward pass per request, as the FastAPI + PyTorch tutorials
show it: an ``async def`` route that reads the upload, decodes it with Pillow, applies the
model's evaluation transform and calls the model. Deliberately not part of the package.

    python benchmarks/serve_naive_peer.py RUN_FOLDER --port 8001
"""

from __future__ import annotations

import argparse
import io

import torch
import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image

from imagerec import Classifier
from imagerec.data import eval_transform


def build_app(model_path: str) -> FastAPI:
    clf = Classifier.load(model_path)
    model, classes = clf.model_, clf.classes_
    transform = eval_transform(clf.preprocessing_)
    app = FastAPI()

    @app.post("/predict")
    async def predict(file: UploadFile = File(...)):
        image = Image.open(io.BytesIO(await file.read())).convert("RGB")
        with torch.inference_mode():
            proba = model(transform(image).unsqueeze(0)).softmax(1)[0]
        best = int(proba.argmax())
        return {"class": classes[best], "probability": float(proba[best])}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(build_app(args.model), host="127.0.0.1", port=args.port, log_level="warning")
