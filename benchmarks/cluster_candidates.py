"""Candidate k-means settings on the development suite's sets (issue 21, clustering defaults).

imagerec's k-means (``cluster_images(method="kmeans")``) with each candidate -- restarts
(``n_init`` 4, 10, 20), PCA to 32 or 64 dimensions or none, whitening -- on the train split's
features (``backbone="auto"``, the suite's cache), 5 seeds each; prints (mean ACC, worst seed's
ACC) per candidate. Run: ``python benchmarks/cluster_candidates.py brain_tumor_mri,clothing_small``.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402

from imagerec import cluster_images  # noqa: E402
from imagerec.clustering import clustering_scores  # noqa: E402

work = Path("/tmp/imagerec-suite")
cands = {"n4": dict(params={"n_init": 4}), "n10": dict(params={"n_init": 10}), "n20": dict(params={"n_init": 20}),
         "n10_pca64": dict(params={"n_init": 10}, pca_dim=64), "n10_nopca": dict(params={"n_init": 10}, pca_dim=None),
         "n10_whiten": dict(params={"n_init": 10}, whiten=True)}
names = sys.argv[1].split(",")
for name in names:
    data = suite.SetData(name, work, 0)
    own = data.train_rows(data.auto()); y = own.labels
    row = {}
    for c, kw in cands.items():
        accs = [clustering_scores(y, cluster_images(own, method="kmeans", k=data.k, random_state=s, progress=False, **kw).labels)["acc"] for s in range(5)]
        row[c] = (round(float(np.mean(accs)), 3), round(float(np.min(accs)), 3))
    print(name, row, flush=True)
