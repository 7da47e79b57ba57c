"""Search an index by example: query images are embedded with the index's own model."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..checkpoint import feature_model
from ..data import (
    DEFAULT_MAX_PIXELS,
    SMALL_IMAGE_MAX_SIDE,
    DecodeError,
    ImageSource,
    Preprocessing,
    Skipped,
    is_image_file,
    load_images,
    load_rgb,
    report_skipped,
)
from ..embedding import Embeddings, embed
from ..errors import ImagerecError
from . import _store
from ._encoder import QueryEncoder


class SearchIndex:
    """A loaded index: search it with images, folders, embeddings or feature vectors.

    Attributes:
        folder: the index folder.
        meta: its meta JSON (backbone, preprocessing, kind, count...).
        faiss_index: the FAISS index.
        items: the image of each vector (:class:`~imagerec.index._store.Items`).
        skipped: unreadable images left out when it was built (0 once reloaded).
    """

    def __init__(self, folder: Path, meta: dict, faiss_index, items: _store.Items, skipped: int = 0):
        self.folder, self.meta, self.faiss_index, self.items, self.skipped = folder, meta, faiss_index, items, skipped
        self._model = self._encoder = self._vectors = None

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    @property
    def backbone(self) -> str:
        return self.meta["backbone"]

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.meta["preprocessing"])

    @property
    def kind(self) -> str:
        """``"flat"`` (exact), ``"ivf"`` (approximate, in RAM) or ``"ivfpq"`` (approximate, on disk, re-ranked)."""
        return self.meta["kind"]

    def describe(self) -> str:
        """One line: exact or IVF search, over how many vectors, made by which backbone."""
        return _store.describe(self.meta)

    def check_compatible(self, backbone: str, preprocessing: Preprocessing, what: str, dim: int | None = None) -> None:
        """Refuse features made by another model than the index's.

        Raises:
            ImagerecError: backbone, preprocessing or (when given) the feature dimension differ from the index's.
        """
        mine = self.preprocessing
        if dim is not None and backbone == self.backbone and preprocessing == mine and dim != self.faiss_index.d:
            raise ImagerecError(
                f"{what}: {dim}-dim features, but the index {self.folder} holds {self.faiss_index.d}-dim ones of the same backbone; "
                "the files come from different models: embed again with the index's backbone (or rebuild the index)"
            )
        if backbone != self.backbone or preprocessing != mine:
            raise ImagerecError(
                f"{what}: made with {backbone} at {preprocessing.input_size} px (crop {preprocessing.crop_pct:g}), but the index "
                f"{self.folder} with {self.backbone} at {mine.input_size} px (crop {mine.crop_pct:g}); its vectors are not comparable: "
                "query with images (they are embedded with the index's model), or embed with the index's backbone and size"
            )

    def search(
        self,
        queries,
        top_k: int = 10,
        *,
        nprobe: int | None = None,
        rerank: int | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        engine: str = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> pd.DataFrame:
        """The ``top_k`` most similar indexed images of each query.

        Args:
            queries: an image file, a folder of images, a PIL image (an upload), an embeddings
                ``.npz`` or :class:`~imagerec.Embeddings` made with the index's model, or a list of these.
            top_k: neighbours per query.
            nprobe: IVF lists visited per query (default: the index's); ignored by an exact index.
            rerank: on-disk IVF-PQ index: candidates per query re-ranked by exact cosine (default: the index's).
            batch_size: query images per forward pass.
            device: ``"cpu"``, ``"cuda"`` or ``"auto"`` for embedding the queries.
            engine: ``"auto"`` (default) or ``"onnx"``: on a CPU, the index's backbone as one ONNX
                Runtime session kept warm between calls; ``"torch"`` (or a GPU device):
                :func:`~imagerec.embed` with PyTorch.
            max_pixels: decompression-bomb limit per query image.

        Returns:
            A DataFrame with one row per (query, neighbour): ``query``, ``rank`` (1 = most
            similar), ``path``, ``score`` (cosine similarity, higher is closer) and ``label``
            when the index is labelled. Unreadable query images are reported and left out.

        Raises:
            ImagerecError: bad arguments, no readable query, or queries from another model.
        """
        _check_top_k(top_k)
        names, features = self.embed_queries(queries, batch_size=batch_size, device=device, engine=engine, max_pixels=max_pixels)
        return self.search_features(features, names, top_k, nprobe=nprobe, rerank=rerank)

    def search_features(
        self, features: np.ndarray, names: list[str], top_k: int = 10, *, nprobe: int | None = None, rerank: int | None = None
    ) -> pd.DataFrame:
        """Search with feature vectors made by the index's model.

        Args:
            features: float array of shape (Q, D), D the index's dimension.
            names: what to call each query in the ``query`` column (Q names).
            top_k: neighbours per query.
            nprobe: IVF lists visited per query (default: the index's).
            rerank: on-disk IVF-PQ index: candidates re-ranked by exact cosine (default: the index's).

        Returns:
            The DataFrame of :meth:`search`.

        Raises:
            ImagerecError: wrong shape, or bad ``top_k``/``nprobe``.
        """
        _check_top_k(top_k)
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.faiss_index.d or len(names) != len(features):
            raise ImagerecError(
                f"query features of shape {features.shape} ({len(names)} names) do not fit an index of {self.faiss_index.d}-dim "
                "vectors; give (Q, D) features from the index's backbone, one name per row"
            )
        if nprobe is not None and self.kind != "flat":
            if nprobe < 1:
                raise ImagerecError(f"nprobe={nprobe} must be at least 1; the index's default is {self.meta.get('nprobe')}")
        if rerank is not None and rerank < 1:
            raise ImagerecError(f"rerank={rerank} must be at least 1 candidate; the index's default is {self.meta.get('rerank')}")
        with _faiss_threads(1 if len(features) <= FEW_QUERIES else None):
            scores, ids = self.search_vectors(_store.l2_normalize(features), min(top_k, len(self)), nprobe=nprobe, rerank=rerank)
        rows = [
            (name, rank + 1, float(score), i)
            for name, row_ids, row_scores in zip(names, ids, scores)
            for rank, (i, score) in enumerate((i, s) for i, s in zip(row_ids, row_scores) if i >= 0)
        ]
        table = pd.DataFrame(rows, columns=["query", "rank", "score", "id"])
        paths, labels = self.items.take(table["id"].tolist())
        table.insert(2, "path", paths)
        if labels is not None:
            table["label"] = labels
        return table.drop(columns="id")

    def search_vectors(self, vectors: np.ndarray, k: int, *, nprobe: int | None = None, rerank: int | None = None):
        """The ``k`` nearest rows of L2-normalised float32 ``vectors`` (Q, D): (scores (Q, k), ids (Q, k)).

        Exact for a flat index; an IVF index visits ``nprobe`` lists; the on-disk IVF-PQ index also
        re-ranks ``rerank`` candidates per query by exact cosine (default: the index's). -1 marks no row.
        """
        if self.kind == "ivfpq":
            from . import _ondisk  # noqa: PLC0415

            _ondisk.set_nprobe(self.faiss_index, nprobe or int(self.meta["nprobe"]))
            if self._vectors is None:
                self._vectors = _ondisk.vectors_of(self.folder, self.meta)
            return _ondisk.search(self.faiss_index, self._vectors, vectors, k, rerank or int(self.meta["rerank"]))
        if hasattr(self.faiss_index, "nprobe"):
            self.faiss_index.nprobe = nprobe or int(self.meta.get("nprobe", _store.NPROBE))
        return self.faiss_index.search(vectors, k)

    def embed_queries(self, queries, **embed_args) -> tuple[list[str], np.ndarray]:
        """(names, features (Q, D)) of the queries, embedded with the index's model (see :meth:`search`)."""
        items = [queries] if isinstance(queries, (str, os.PathLike, Embeddings, Image.Image)) else list(queries)
        if not items:
            raise ImagerecError("no query given; give an image file, a folder of images or an embeddings .npz")
        names, blocks, files = [], [], []
        for q in items:
            if isinstance(q, Image.Image):  # an image already in memory (an upload): embedded on its own
                pixels = np.asarray(q.convert("RGB"))[None]
                found, features = self._embed_source(ImageSource([f"<image {len(names)}>"], None, None, "query", pixels=pixels), **embed_args)
                names += found
                blocks.append(features)
            elif isinstance(q, Embeddings) or str(q).lower().endswith(".npz"):
                given = q if isinstance(q, Embeddings) else Embeddings.load(q)
                self.check_compatible(given.backbone, given.preprocessing, "query" if isinstance(q, Embeddings) else str(q), given.features.shape[1])
                names += given.paths
                blocks.append(given.features)
            else:
                files += _image_files(q)
        if files:
            found, features = self._embed_source(_query_source(files, embed_args.get("max_pixels", DEFAULT_MAX_PIXELS)), **embed_args)
            names += found
            blocks.append(features)
        return names, np.concatenate(blocks).astype(np.float32, copy=False)

    def _embed_source(
        self, source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, batch_size: int = 64, device: str = "cpu", engine: str = "auto"
    ) -> tuple[list[str], np.ndarray]:
        pp = self.preprocessing
        if engine not in ("auto", "onnx", "torch"):
            raise ImagerecError(f"engine {engine!r} is not one of auto, torch, onnx")
        if engine != "torch" and device == "cpu" and importlib.util.find_spec("onnxruntime"):
            if self._encoder is None:
                self._encoder = QueryEncoder(self.backbone, pp)
            paths, features, skipped = self._encoder(source, batch_size)
        else:
            if self._model is None:
                self._model = feature_model(self.backbone, pretrained=True)
            if not len(source):
                paths, features, skipped = [], None, source.skipped
            else:
                result = embed(source, self._model, image_size=pp.input_size, crop_pct=pp.crop_pct, progress=False,
                               max_pixels=max_pixels, batch_size=batch_size, device=device, engine=engine)  # fmt: skip
                self.check_compatible(result.backbone, result.preprocessing, "query")
                paths, features, skipped = result.paths, result.features, []
        if not paths:  # one line, like embed's: the error names the count and the first reason
            raise ImagerecError(f"none of the {len(source) + len(source.skipped)} query image(s) could be read (e.g. {skipped[0].path}: {skipped[0].reason})")
        report_skipped(skipped, None)
        return paths, features


FEW_QUERIES = 8  # up to this many queries FAISS searches on one thread (see _faiss_threads)


@contextlib.contextmanager
def _faiss_threads(threads: int | None):
    """FAISS's OpenMP threads for one search. A few queries are scanned faster on one thread: on the
    shared 2-core VM one query against 60,000 vectors took 26 ms on one thread and 84 ms on two
    (docs/BENCHMARKS.md, "Index and search"), the threads' barriers waiting on busy cores."""
    import faiss  # noqa: PLC0415

    before = faiss.omp_get_max_threads()
    if threads:
        faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def load_index(index_dir: str | os.PathLike) -> SearchIndex:
    """Open an index folder written by :func:`~imagerec.build_index`.

    Raises:
        ImagerecError: the folder is not an index, or its files are damaged.
    """
    meta, index, items = _store.read(index_dir)
    return SearchIndex(Path(index_dir), meta, index, items)


def _check_top_k(top_k) -> None:
    if not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ImagerecError(f"top_k={top_k!r} must be a whole number of neighbours, at least 1; e.g. 10")


def _image_files(query) -> list[str]:
    """The image files a query names: the file itself, or every image under a folder."""
    path = Path(query)
    if path.is_dir():
        return load_images(path, labelled=False).paths
    if not path.exists():
        raise ImagerecError(f"query {query}: no such file or folder; give an image file, a folder of images or an embeddings .npz")
    if not is_image_file(path.name):
        raise ImagerecError(f"query {query}: not an image file (by its extension); give an image (jpg, png...), a folder or an embeddings .npz")
    return [str(path)]


def _query_source(files: list[str], max_pixels: int) -> ImageSource:
    """The query images, decoded here when small (so the decode cache is not written per query)."""
    images, skipped = {}, []
    for f in files:
        try:
            images[f] = load_rgb(f, max_pixels)
        except DecodeError as e:
            skipped.append(Skipped(f, str(e)))
        if f in images and max(images[f].size) > SMALL_IMAGE_MAX_SIDE:
            return ImageSource(list(files), None, None, "queries", max_pixels=max_pixels)  # large: embed reads them
    sizes = {im.size for im in images.values()}
    pixels = np.stack([np.asarray(im) for im in images.values()]) if len(sizes) == 1 else None
    paths = list(images)
    if pixels is None:
        return ImageSource(paths, None, None, "queries", skipped=skipped, max_pixels=max_pixels)
    return ImageSource(paths, None, None, "queries", pixels=pixels, skipped=skipped, max_pixels=max_pixels)
