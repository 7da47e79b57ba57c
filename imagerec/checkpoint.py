"""Checkpoints that are safe to load and never half-written.

One ``.safetensors`` file holds every tensor (the model's, and the optimizer's when training
can resume) and, in the safetensors header, a JSON document with everything else: backbone,
class names, preprocessing, configuration, progress, metrics and the imagerec version. There is
no pickle anywhere, so loading a checkpoint cannot run code. A SHA-256 over the tensors AND the
header's format and metadata document (class names, preprocessing, configuration...) is stored
too, so a truncated, damaged or edited file is refused with a clear error instead of loading
silently. The checksum has no key: it catches accidental damage and careless edits, not a
deliberate forger, who can recompute it. Files are written atomically (temporary file, fsync,
rename).

Checkpoints written before the checksum covered the metadata (header without ``covers``) are
still read: their tensors are verified the old way and a warning says that their metadata is
not covered; saving them again (``train --resume`` does) writes the new form.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save_file
from torch import nn

from ._io import atomic_path, file_sha256
from ._version import __version__
from .errors import ImagerecError, ImagerecWarning

FORMAT = "imagerec.checkpoint/1"
COVERS = "tensors+format+meta"  # what the header's sha256 covers (absent: tensors alone, older files)
BEST, LAST = "best.safetensors", "last.safetensors"


@dataclass
class Checkpoint:
    """The contents of a checkpoint file.

    Attributes:
        model: the model's state dict.
        meta: JSON-able facts: ``backbone``, ``classes``, ``preprocessing``, ``config``,
            ``epoch``, ``step``, ``metrics``, ``temperature`` (calibration; absent: 1)... (see
            ``imagerec.training``).
        optimizer: the optimizer's state dict, or None (a checkpoint for inference only).
    """

    model: dict[str, torch.Tensor]
    meta: dict
    optimizer: dict | None = None
    path: Path | None = field(default=None, compare=False)


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``path`` atomically.

    Returns:
        The path written.
    """
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in ckpt.model.items()}
    optim_meta = None
    if ckpt.optimizer is not None:
        optim_meta = {"param_groups": ckpt.optimizer["param_groups"], "state": {}}
        for index, state in ckpt.optimizer["state"].items():
            optim_meta["state"][str(index)] = {}
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
                else:
                    optim_meta["state"][str(index)][key] = value
    meta_text = json.dumps(dict(ckpt.meta, imagerec_version=__version__, optimizer=optim_meta))
    header = {"format": FORMAT, "meta": meta_text, "covers": COVERS, "sha256": _digest(tensors, FORMAT, meta_text)}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return Path(path)


def resolve_checkpoint(path: str | os.PathLike, name: str = BEST) -> Path:
    """A checkpoint file, or the ``name`` checkpoint of a run folder (its best by default).

    Raises:
        ImagerecError: the path does not exist, or the folder holds no such checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        for candidate in (name, LAST):
            if (path / candidate).is_file():
                return path / candidate
        raise ImagerecError(f"{path}: no {name} or {LAST} in this folder; pass a run folder of 'imagerec train' or a .safetensors file")
    if not path.is_file():
        raise ImagerecError(f"{path}: no such checkpoint file or run folder")
    return path


def load_checkpoint(path: str | os.PathLike, name: str = BEST) -> Checkpoint:
    """Read a checkpoint file (or a run folder's best checkpoint), verifying its checksum.

    Raises:
        ImagerecError: missing, truncated, damaged or edited (tensors or metadata), broken
            metadata, or not an imagerec checkpoint.
    """
    path = resolve_checkpoint(path, name)
    try:
        header, tensors = _read(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ImagerecError(f"{path}: not a readable checkpoint, truncated or corrupt ({e}); use another checkpoint, e.g. the run's {LAST}") from None
    if header.get("format") != FORMAT:
        raise ImagerecError(f"{path}: a safetensors file, but not an imagerec checkpoint (format {header.get('format')!r})")
    meta_text = header.get("meta", "")
    if header.get("covers") == COVERS:
        expected = _digest(tensors, FORMAT, meta_text)
    elif "covers" in header:
        raise ImagerecError(f"{path}: checksum scope {header['covers']!r} is unknown to imagerec {__version__}; upgrade imagerec")
    else:
        expected = _digest(tensors)
        warnings.warn(
            f"{path}: written by an older imagerec whose checksum covers the tensors only, not the class names and "
            "preprocessing; resume or re-save it to protect them too",
            ImagerecWarning,
            stacklevel=2,
        )
    if header.get("sha256") != expected:
        raise ImagerecError(f"{path}: checksum mismatch: the file was modified or damaged after it was written; do not use it")
    meta = _parse_meta(path, meta_text)
    try:
        optimizer = _optimizer_state(meta.pop("optimizer", None), tensors)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ImagerecError(f"{path}: broken optimizer metadata ({type(e).__name__}: {e}); use another checkpoint, e.g. the run's {BEST}") from None
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    return Checkpoint(model=model, meta=meta, optimizer=optimizer, path=path)


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The header metadata and the tensors of a safetensors file, from one read of its bytes.

    One read, so that both come from the same file while a training run replaces it (a reader that
    opens the path twice, as ``safe_open`` does, can pair one file's header with the next one's
    tensors and report a damaged checkpoint).
    """
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes, shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return (meta if isinstance(meta, dict) else {}), load_tensors(data)


META_TYPES = {  # field: (accepted types, what the message calls them)
    "backbone": (str, "a string"),
    "classes": (list, "a list of strings"),
    "preprocessing": (dict, "an object"),
    "config": (dict, "an object"),
    "plan": (dict, "an object"),
    "history": (list, "a list"),
    "step": (int, "an integer"),
    "temperature": ((int, float), "a number > 0"),
    "optimizer": ((dict, type(None)), "an object or null"),
}


def _parse_meta(path: Path, text: str) -> dict:
    """The metadata document, its known fields checked for type (one-line errors, no traceback)."""
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, TypeError) as e:
        raise ImagerecError(f"{path}: broken metadata, not valid JSON ({e}); use another checkpoint, e.g. the run's {LAST}") from None
    if not isinstance(meta, dict):
        raise ImagerecError(f"{path}: broken metadata: a JSON {type(meta).__name__} where an object belongs; use another checkpoint")
    for key, (types, words) in META_TYPES.items():
        value = meta.get(key)
        bad = key in meta and (not isinstance(value, types) or isinstance(value, bool))
        if key == "temperature" and key in meta and not bad:
            bad = not 0 < value < float("inf")
        if key == "classes" and not bad:
            bad = not value or not all(isinstance(c, str) for c in value) or len(set(value)) != len(value)
            words = "a non-empty list of distinct strings"
        if bad:
            raise ImagerecError(f"{path}: broken metadata: {key!r} is {value!r}, it must be {words}; use another checkpoint")
    return meta


def _optimizer_state(optim_meta: dict | None, tensors: dict[str, torch.Tensor]) -> dict | None:
    """The optimizer's state dict from its JSON part and its ``optim.I.KEY`` tensors."""
    if optim_meta is None:
        return None
    state = {int(i): dict(extra) for i, extra in optim_meta["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    if not isinstance(optim_meta["param_groups"], list):
        raise TypeError("param_groups must be a list")
    return {"state": state, "param_groups": optim_meta["param_groups"]}


def _digest(tensors: dict[str, torch.Tensor], *texts: str) -> str:
    """SHA-256 of every tensor (name, dtype, shape, bytes) and then of ``texts`` (the header)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key]
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for text in texts:
        encoded = text.encode("utf-8", "surrogatepass")
        digest.update(f"|{len(encoded)}|".encode() + encoded)
    return digest.hexdigest()


def checkpoint_temperature(ckpt: Checkpoint) -> float:
    """The calibration temperature T of a checkpoint: probabilities are softmax(logits / T).

    Checkpoints written before calibration existed, or trained with ``calibrate=False`` or with
    no held-out images, have none: T = 1, the plain softmax.
    """
    return float(ckpt.meta.get("temperature", 1.0))


def model_from_checkpoint(ckpt: Checkpoint) -> nn.Module:
    """The classifier a checkpoint holds, in eval mode, with ``model.preprocessing`` set.

    The registry builds ``meta["backbone"]``; layers whose stored weights are narrower (a model
    pruned by ``imagerec compress --prune``) are narrowed to match before the weights load.

    Raises:
        ImagerecError: the checkpoint lacks backbone, classes or preprocessing, or its weights do
            not fit the backbone.
    """
    from .backbones import create_backbone
    from .data import Preprocessing

    meta = ckpt.meta
    for key in ("backbone", "classes", "preprocessing"):
        if key not in meta:
            raise ImagerecError(f"{ckpt.path}: checkpoint lacks {key!r}; it was not written by imagerec train")
    model = create_backbone(meta["backbone"], num_classes=len(meta["classes"]), pretrained=False)
    fit_layer_shapes(model, ckpt.model)
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        model.num_features = head.in_features  # the embedding width, narrower after pruning
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as e:
        raise ImagerecError(f"{ckpt.path}: weights do not fit backbone {meta['backbone']!r} ({str(e).splitlines()[0]})") from None
    try:
        model.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    except (TypeError, ValueError, KeyError) as e:
        raise ImagerecError(f"{ckpt.path}: broken metadata: preprocessing {meta['preprocessing']!r} ({e}); use another checkpoint") from None
    return model.eval()


def fit_layer_shapes(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Resize the convolutions, batch norms and linear layers of ``model`` to the shapes in ``state``.

    Structured pruning removes channels, so a pruned model is its backbone with narrower layers:
    this rebuilds that shape from the weights alone, with no pickled module. Depthwise
    convolutions keep one group per channel. Layers already of the right shape are untouched.
    """
    for name, module in model.named_modules():
        weight = state.get(f"{name}.weight" if name else "weight")
        if weight is None or weight.shape == module.weight.shape:
            continue
        if isinstance(module, nn.Conv2d):
            depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
            module.out_channels = weight.shape[0]
            module.in_channels = weight.shape[0] if depthwise else weight.shape[1] * module.groups
            if depthwise:
                module.groups = weight.shape[0]
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.num_features = weight.shape[0]
            for buffer in ("running_mean", "running_var"):
                setattr(module, buffer, torch.empty(weight.shape[0]))
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = weight.shape
        else:
            continue
        module.weight = nn.Parameter(torch.empty_like(weight))
        if getattr(module, "bias", None) is not None:
            module.bias = nn.Parameter(torch.empty(weight.shape[0]))


RUN_PREFIX = "run:"  # a backbone spec naming a trained run: "run:RUN_FOLDER" or "run:FILE.safetensors"


def feature_model(spec: str | nn.Module, *, pretrained: bool | None = None) -> nn.Module:
    """The model that embeds images, from a backbone spec: the one place that reads one.

    Args:
        spec: a model (returned as it is); ``"run:PATH"``: the fine-tuned network of a run folder
            of ``imagerec train`` (its best checkpoint) or of a checkpoint file, with the run's
            preprocessing (see :func:`run_feature_model`); else a registry name (its pretrained
            weights, without a head).
        pretrained: registry names only: True requires pretrained weights, None (the default)
            loads them where the backbone has them, False leaves the weights random.

    Raises:
        ImagerecError: an unknown name, or a run that cannot be read.
    """
    if isinstance(spec, nn.Module):
        return spec
    if str(spec).startswith(RUN_PREFIX):
        return run_feature_model(str(spec)[len(RUN_PREFIX):])
    from .backbones import create_backbone

    return create_backbone(spec, num_classes=0, pretrained=pretrained)


def run_feature_model(path: str | os.PathLike) -> nn.Module:
    """A trained run's network as a feature extractor (its pooled features, before the head).

    Its ``backbone_name`` is ``"run:/abs/file.safetensors#DIGEST"`` (the first 16 hex digits of
    the file's SHA-256), so features, caches and indexes made with it name the exact weights, and
    a name with a digest loads only that file: a checkpoint changed since refuses to stand in.

    Raises:
        ImagerecError: no such run or checkpoint, a damaged one, or a digest that no longer matches.
    """
    text = os.fspath(path)
    where, sep, want = text.rpartition("#")
    if not sep or not (len(want) == 16 and all(c in "0123456789abcdef" for c in want)):
        where, want = text, ""
    file = resolve_checkpoint(where).resolve()
    digest = file_sha256(file)[:16]
    if want and want != digest:
        raise ImagerecError(
            f"{file}: the checkpoint changed since these features were made (sha256 {digest}..., recorded {want}...); "
            "embed again with the run as it is now (rebuild the index or embeddings)"
        )
    model = model_from_checkpoint(load_checkpoint(file))
    model.backbone_name = f"{RUN_PREFIX}{file}#{digest}"
    return model
