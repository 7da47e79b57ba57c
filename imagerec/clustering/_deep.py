"""Deep clustering head: SCAN (Van Gansbeke et al., ECCV 2020) on frozen features.

SCAN's clustering step, on feature vectors from any backbone (ImageNet features, or those of a
backbone adapted to the images beforehand, which is not this module's job):

1. mine each image's ``n_neighbors`` nearest neighbours in the feature space;
2. train small heads (softmax over K clusters) so an image and a random one of its neighbours get
   the same cluster, ``-log <p_i, p_j>``, while the mean prediction over a batch stays spread
   over all clusters (``entropy_weight`` times its entropy, subtracted), which prevents the
   trivial solution of one cluster; several heads train at once and the one with the lowest
   loss is kept;
3. optionally self-label: images whose prediction is above ``confidence`` become pseudo-labels,
   and the head is trained on them with class-balanced cross-entropy on perturbed inputs.

"Augmentation" here acts on the features (dropout and Gaussian noise), since the images are not
seen again. Training runs on the CPU in seconds to minutes: the backbone stays frozen.
Seeded: the same ``random_state`` and data give the same clusters. On the CPU the head trains
on one thread: its matrices are small, so more threads only add overhead (and on a busy
machine, a lot of it), and one thread makes the result independent of the number of cores.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._engine import Callback, Loop, StepOutput, WarmupCosine
from .._optim import decay_groups
from ..errors import ImagerecError
from ..inference import resolve_device
from ._base import BaseClustering, cluster_means
from ._checks import check_positive, warn
from ._neighbors import knn


class DeepClustering(BaseClustering):
    """SCAN-style clustering head on frozen feature vectors (``method="deep"``).

    Args:
        n_clusters: number of clusters K.
        n_neighbors: mined neighbours per image (SCAN uses 20).
        hidden_dim: width of the heads' hidden layer; 0 for linear heads.
        n_heads: heads trained together; the lowest-loss one is kept.
        epochs: passes of the SCAN step over the images.
        batch_size: images per step (at most N / 8, so that a small collection still gets
            several steps per epoch).
        lr: Adam learning rate (per batch of ``batch_size``).
        weight_decay: Adam weight decay (on weights, not on norm weights and biases).
        entropy_weight: weight of the entropy of the mean prediction (SCAN: 5).
        self_label_epochs: passes of self-labelling after the SCAN step (0: none).
        confidence: prediction above which an image becomes a pseudo-label (SCAN: 0.99).
        dropout: feature dropout used as augmentation, in [0, 1).
        noise: standard deviation of Gaussian noise added as augmentation, in units of the
            features' standard deviation.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        random_state: seed.
        verbose: print one line per epoch on stderr.

    Attributes:
        labels_: int64 array (N,).
        probabilities_: float array (N,): the probability of each image's cluster.
        cluster_centers_: float array (K, D): mean features of each cluster (zeros if empty).
        neighbors_: int64 array (N, n_neighbors): the mined neighbours.
        history_: list of dicts ``{"phase", "epoch", "loss"}``.
        n_confident_: images above ``confidence`` when self-labelling started.
        head_loss_: the final SCAN loss of each head (the lowest one was kept).
    """

    _has_centres = True

    def __init__(
        self,
        n_clusters: int = 10,
        *,
        n_neighbors: int = 20,
        hidden_dim: int = 256,
        n_heads: int = 3,
        epochs: int = 40,
        batch_size: int = 512,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        entropy_weight: float = 5.0,
        self_label_epochs: int = 10,
        confidence: float = 0.99,
        dropout: float = 0.1,
        noise: float = 0.1,
        device: str = "cpu",
        random_state: int | None = 0,
        verbose: bool = False,
    ):
        self.n_clusters = n_clusters
        self.n_neighbors = n_neighbors
        self.hidden_dim = hidden_dim
        self.n_heads = n_heads
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.entropy_weight = entropy_weight
        self.self_label_epochs = self_label_epochs
        self.confidence = confidence
        self.dropout = dropout
        self.noise = noise
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def _check_params(self, n_samples: int) -> None:
        check_positive(self.n_neighbors, "n_neighbors", integer=True, minimum=1, inclusive=True, hint="; try 20")
        check_positive(
            self.hidden_dim, "hidden_dim", integer=True, minimum=0, inclusive=True, hint="; 0 means linear heads"
        )
        check_positive(self.n_heads, "n_heads", integer=True, minimum=1, inclusive=True, hint="; try 3")
        check_positive(self.epochs, "epochs", integer=True, minimum=1, inclusive=True, hint="; try 40")
        check_positive(self.batch_size, "batch_size", integer=True, minimum=2, inclusive=True, hint="; try 512")
        check_positive(self.lr, "lr", hint="; try 1e-3")
        check_positive(self.weight_decay, "weight_decay", minimum=0.0, inclusive=True)
        check_positive(self.entropy_weight, "entropy_weight", minimum=0.0, inclusive=True, hint="; SCAN uses 5")
        check_positive(self.self_label_epochs, "self_label_epochs", integer=True, minimum=0, inclusive=True)
        check_positive(self.confidence, "confidence", hint="; SCAN uses 0.99")
        check_positive(self.noise, "noise", minimum=0.0, inclusive=True)
        check_positive(self.dropout, "dropout", minimum=0.0, inclusive=True)
        if self.confidence >= 1 or self.dropout >= 1:
            name, value = ("confidence", self.confidence) if self.confidence >= 1 else ("dropout", self.dropout)
            raise ImagerecError(f"{name}={value} must be below 1; try 0.99 for confidence, 0.1 for dropout")
        self._device = resolve_device(self.device)

    def _fit(self, X: np.ndarray) -> None:
        # 1. neighbours in the frozen feature space, and inputs scaled to unit variance
        k_nn = min(self.n_neighbors, len(X) - 1)
        _, self.neighbors_ = knn(X, k_nn)
        self._mean = X.mean(0).astype(np.float32)
        self._scale = float(np.sqrt(np.mean((X - self._mean) ** 2))) or 1.0
        with _one_cpu_thread(self._device):
            self._train(X)

    def _train(self, X: np.ndarray) -> None:
        x = self._to_tensor(X)
        neighbors = torch.as_tensor(self.neighbors_, device=self._device)
        seed = int(np.random.default_rng(self.random_state).integers(2**31))
        generator = torch.Generator(device=self._device).manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # module initialisation draws from the global generator
            torch.manual_seed(seed)
            heads = _Heads(X.shape[1], self.n_clusters, self.hidden_dim, self.n_heads).to(self._device)
        self.history_ = []
        # 2. SCAN: neighbour consistency plus entropy, all heads at once; keep the best head
        self._train_scan(heads, x, neighbors, generator)
        losses = _scan_loss_per_head(heads, x, neighbors, self.entropy_weight)
        self.head_loss_ = losses.tolist()
        self._head = heads.heads[int(losses.argmin())]
        # 3. self-labelling on confident images
        if self.self_label_epochs:
            self._train_self_label(x, generator)
        proba = self._predict_proba_tensor(x)
        self.probabilities_, labels = (t.cpu().numpy() for t in proba.max(1))
        self.probabilities_ = self.probabilities_.astype(np.float64)
        self.labels_ = labels.astype(np.int64)
        self.cluster_centers_ = _centres(X, self.labels_, self.n_clusters)

    def _train_scan(self, heads: _Heads, x: torch.Tensor, neighbors: torch.Tensor, generator: torch.Generator) -> None:
        optimizer = torch.optim.Adam(decay_groups(heads.parameters(), self.weight_decay, self.lr))
        k_nn = neighbors.shape[1]

        def step(batch: torch.Tensor) -> StepOutput:
            pick = torch.randint(k_nn, (len(batch),), generator=generator, device=self._device)
            pair = torch.cat([x[batch], x[neighbors[batch, pick]]])
            proba = F.softmax(heads(self._augment(pair, generator)), dim=-1)  # (H, 2B, K)
            anchor, neighbour = proba[:, : len(batch)], proba[:, len(batch) :]
            loss = _scan_loss(anchor, neighbour, self.entropy_weight).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return StepOutput(len(batch), float(loss.detach()) / len(heads.heads) * len(batch))

        heads.train()
        self._run(step, len(x), generator, self.epochs, optimizer, "scan")

    def _train_self_label(self, x: torch.Tensor, generator: torch.Generator) -> None:
        head = self._head
        optimizer = torch.optim.Adam(decay_groups(head.parameters(), self.weight_decay, self.lr / 10))
        self.n_confident_ = int((self._predict_proba_tensor(x).max(1).values > self.confidence).sum())
        if self.n_confident_ == 0:
            warn(
                f"no image reached confidence={self.confidence}; self-labelling was skipped (lower confidence, or set self_label_epochs=0)",
                6,
            )
            return

        def step(batch: torch.Tensor) -> StepOutput | None:
            head.eval()
            with torch.no_grad():
                confidence, target = F.softmax(head(x[batch]), dim=-1).max(1)
            mask = confidence > self.confidence
            if int(mask.sum()) == 0:
                return None
            # class-balanced cross-entropy: rare pseudo-classes weigh more (as in SCAN)
            counts = torch.bincount(target[mask], minlength=self.n_clusters).float()
            weight = torch.where(counts > 0, mask.sum() / counts.clamp_min(1), torch.ones_like(counts))
            head.train()
            logits = head(self._augment(x[batch], generator))
            loss = F.cross_entropy(logits[mask], target[mask], weight=weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return StepOutput(len(batch), float(loss.detach()) * len(batch))

        self._run(step, len(x), generator, self.self_label_epochs, optimizer, "self-label")

    def _run(self, step, n: int, generator: torch.Generator, epochs: int, optimizer, phase: str) -> None:
        """``epochs`` passes of ``step`` over the ``n`` images, in shuffled batches, at Adam's
        constant rate; one line of history an epoch."""
        # at least 8 steps per epoch, so that small collections are trained too
        size = max(2, min(self.batch_size, -(-n // 8)))
        per_epoch = -(-n // size) - (n % size == 1)  # a last batch of one image is left out

        def batches(epoch: int, first: int):
            order = torch.randperm(n, generator=generator, device=self._device)
            for batch in order.split(size):
                if len(batch) >= 2:  # batch normalisation needs two images
                    yield batch

        callbacks = [WarmupCosine(optimizer, constant=True), _EpochLog(self, phase)]
        Loop(step, batches, total=epochs * per_epoch, steps_per_epoch=per_epoch, callbacks=callbacks).run()

    def _augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.dropout:
            keep = torch.rand(x.shape, generator=generator, device=x.device) >= self.dropout
            x = x * keep / (1 - self.dropout)
        if self.noise:
            x = x + self.noise * torch.randn(x.shape, generator=generator, device=x.device)
        return x

    def _to_tensor(self, X: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((X.astype(np.float32) - self._mean) / self._scale, device=self._device)

    def _predict_proba_tensor(self, x: torch.Tensor) -> torch.Tensor:
        self._head.eval()
        with torch.no_grad():
            return torch.cat([F.softmax(self._head(part), dim=-1) for part in x.split(8192)])

    def predict_proba(self, X) -> np.ndarray:
        """Cluster probabilities of new feature vectors.

        Args:
            X: float array (M, D), prepared like the features passed to ``fit``.

        Returns:
            float32 array (M, K), rows summing to 1.

        Raises:
            ImagerecError: not fitted on features of this dimension, or NaN/inf values.
        """
        X = self._check_predict_input(X)
        if self._head is None:  # the one-cluster fit
            return np.ones((len(X), 1), np.float32)
        with _one_cpu_thread(self._device):
            return self._predict_proba_tensor(self._to_tensor(X)).cpu().numpy()

    def predict(self, X) -> np.ndarray:
        """The most probable cluster of each feature vector: int64 array (M,)."""
        return self.predict_proba(X).argmax(1).astype(np.int64)

    def _fit_one_cluster(self, X: np.ndarray) -> None:
        super()._fit_one_cluster(X)
        self._head = None
        self.probabilities_ = np.ones(len(X))
        self.neighbors_ = np.zeros((len(X), 0), np.int64)
        self.history_ = []


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """Run torch on one CPU thread inside the block (see the module docstring), then restore."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _EpochLog(Callback):
    """One line of ``history_`` an epoch (on stderr too when ``verbose``)."""

    def __init__(self, estimator: DeepClustering, phase: str):
        self.estimator, self.phase = estimator, phase

    def on_epoch_end(self, loop: Loop) -> None:
        loss = loop.loss / max(loop.images, 1)
        self.estimator.history_.append({"phase": self.phase, "epoch": loop.epoch, "loss": loss})
        if self.estimator.verbose:
            print(f"deep clustering {self.phase} epoch {loop.epoch + 1}: loss {loss:.4f}", file=sys.stderr)


class _Heads(nn.Module):
    """``n_heads`` independent clustering heads on the same input: logits (H, B, K)."""

    def __init__(self, in_dim: int, n_clusters: int, hidden_dim: int, n_heads: int):
        super().__init__()

        def head() -> nn.Module:
            if hidden_dim == 0:
                return nn.Linear(in_dim, n_clusters)
            return nn.Sequential(
                nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, n_clusters)
            )

        self.heads = nn.ModuleList([head() for _ in range(n_heads)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([h(x) for h in self.heads])


def _scan_loss(anchor: torch.Tensor, neighbour: torch.Tensor, entropy_weight: float) -> torch.Tensor:
    """SCAN's loss per head.

    Args:
        anchor: probabilities (H, B, K) of the images.
        neighbour: probabilities (H, B, K) of one neighbour of each.
        entropy_weight: weight of the entropy of the mean prediction.

    Returns:
        float tensor (H,): consistency minus ``entropy_weight`` times the entropy.
    """
    consistency = -torch.log((anchor * neighbour).sum(-1).clamp_min(1e-8)).mean(-1)
    mean = anchor.mean(1)
    entropy = -(mean * torch.log(mean.clamp_min(1e-8))).sum(-1)
    return consistency - entropy_weight * entropy


def _scan_loss_per_head(heads: _Heads, x: torch.Tensor, neighbors: torch.Tensor, entropy_weight: float) -> torch.Tensor:
    """SCAN's loss of each head on every image and all its neighbours, without augmentation."""
    heads.eval()
    with torch.no_grad():
        proba = torch.cat([F.softmax(heads(part), dim=-1) for part in x.split(8192)], dim=1)  # (H, N, K)
        consistency = sum(
            -torch.log((proba * proba[:, neighbors[:, j]]).sum(-1).clamp_min(1e-8)).mean(-1)
            for j in range(neighbors.shape[1])
        )
        consistency = consistency / neighbors.shape[1]
        mean = proba.mean(1)
        entropy = -(mean * torch.log(mean.clamp_min(1e-8))).sum(-1)
    return (consistency - entropy_weight * entropy).cpu()


def _centres(X: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    centres = np.zeros((k, X.shape[1]), X.dtype)
    means = cluster_means(X, labels)
    centres[: len(means)] = means
    return centres
