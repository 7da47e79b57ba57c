"""Pseudo-label rules on the photo sets (issue 22, part 5): 10 labels a class from the train split,
the suggestions for the rest, and per rule the share of the rest taken and its accuracy (3 seeds).
Run: OMP_NUM_THREADS=1 python benchmarks/pseudo_label_rules.py (results/pseudo_label_rules.txt).
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402
from imagerec.suggest import suggest  # noqa: E402

for name in suite.PHOTO_SETS:
    data = suite.SetData(name, Path("/tmp/imagerec-suite"), 0)
    emb = data.train_rows(data.auto())
    y = emb.labels; k = data.k
    out = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        picked = np.concatenate([rng.choice(np.flatnonzero(y == c), 10, replace=False) for c in range(k)])
        labels = [None] * len(y)
        for i in picked: labels[i] = data.classes[y[i]]
        s = suggest(emb.features, labels)
        conf = s.suggester.confidence_; sug = np.array([data.classes.index(s.classes[i]) for i in s.suggester.suggested_])
        rest = np.setdiff1d(np.arange(len(y)), picked)
        row = {"all": (1.0, np.mean(sug[rest] == y[rest]))}
        for t in (0.5, 0.7, 0.9):
            m = rest[conf[rest] >= t]; row[f"t{t}"] = (len(m)/len(rest), np.mean(sug[m] == y[m]) if len(m) else None)
        for q in (0.25, 0.5):  # top q of each suggested class by confidence
            sel = []
            for c in range(k):
                r = rest[sug[rest] == c]
                if len(r): sel += list(r[np.argsort(-conf[r])][: max(1, int(q * len(r)))])
            sel = np.array(sel); row[f"top{q}"] = (len(sel)/len(rest), np.mean(sug[sel] == y[sel]))
        out.append(row)
    agg = {key: (round(np.mean([r[key][0] for r in out]), 2), round(np.mean([r[key][1] for r in out if r[key][1] is not None]), 3) if any(r[key][1] is not None for r in out) else None) for key in out[0]}
    print(name, "conf quantiles", np.round(np.quantile(conf[rest], [0.1, 0.5, 0.9]), 2), agg, flush=True)
