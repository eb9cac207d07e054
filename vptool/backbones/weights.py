"""Weights files of a backbone: found in the Hugging Face cache, and read safely into a state dict.

``read_state_dict`` reads ``.safetensors``, a JAX ``.npz`` (``numpy.load(allow_pickle=False)``) or a torch pickle
(``torch.load(weights_only=True)``, only ``argparse.Namespace`` allow-listed): nothing in a file is executed.
``hub_source``/``hub_file`` locate a timm model's pretrained weights on the Hugging Face Hub and in the local
cache (downloaded only when ``HF_HUB_OFFLINE`` is unset). ``vptool.backbones.build`` loads what they return
strictly, and re-exports the public names.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

import numpy as np
import torch

from vptool.errors import UserError
from vptool.safeload import is_refusal, refusal, torch_load

__all__ = ["HUB_FILENAMES", "hub_file", "hub_source", "loader_error_line", "read_state_dict", "sha256_file"]


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def loader_error_line(exc: Exception) -> str:
    """One plain line from a loader error (for torch's weights-only refusal: the rejected global)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
    for ln in lines:
        if ln.startswith("WeightsUnpickler error:"):
            return ln[len("WeightsUnpickler error:"):].strip()
    return lines[0] if lines else type(exc).__name__


_RESAVE = "re-save it as a plain state dict of tensors (.safetensors, or .pth of tensors only) or a numeric .npz"


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    """The arrays of a JAX ``.npz`` as float32 tensors, keyed by their '/'-separated names (no pickles)."""
    with np.load(str(path), allow_pickle=False) as npz:
        return {k: torch.from_numpy(np.array(npz[k], dtype=np.float32)) for k in npz.files}


def _cut_zip(path: Path) -> bool:
    """The file starts like a zip archive (torch >= 1.6 files, ``.npz``) but its central directory is gone."""
    import zipfile

    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        return magic == b"PK\x03\x04" and not zipfile.is_zipfile(path)
    except OSError:
        return False


def read_state_dict(path: str | Path, key: str = "backbone.checkpoint") -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, a JAX ``.npz`` or a torch pickle loaded with ``weights_only=True``.

    A torch file may hold the state dict itself or wrap it as ``{"model": sd}`` / ``{"state_dict": sd}``; other
    entries of a training dump (optimizer, epoch, scaler, ``best_acc1``, ``args`` as an ``argparse.Namespace``)
    are read and discarded. ``argparse.Namespace`` is the only class allow-listed beyond torch's weights-only set.
    A file whose name ends in ``.npz`` is read with ``numpy.load(allow_pickle=False)``; its arrays become float32
    tensors under their own names (e.g. ``Transformer/encoder_norm/scale``).

    Raises:
        UserError: the file is missing, truncated or corrupt, unsafe to unpickle, or holds no tensor mapping
            (one line naming ``key`` and the path).
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{key}: {p} not found; point {key} at an existing .safetensors/.pth/.pt/.npz file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        elif p.suffix == ".npz":
            sd = _read_npz(p)
        else:
            # Namespace only restores attributes (no __reduce__/__setstate__ code), so allowing it runs nothing
            sd = torch_load(p, f"{key}: {p}", _RESAVE, allow=(argparse.Namespace,))
    except UserError:
        raise
    except Exception as exc:  # safetensors / zip / pickle errors have many types; all mean "cannot read this file"
        if is_refusal(exc):  # numpy's allow_pickle=False
            raise UserError(f"{key}: {p} {refusal(p, exc)}; {_RESAVE}") from None
        reason = "zip archive cut short: no central directory" if _cut_zip(p) else loader_error_line(exc)
        raise UserError(f"{key}: cannot read {p} ({reason}); the file is truncated, corrupt or not a "
                        "checkpoint: copy it again, or convert it to .safetensors") from None
    if isinstance(sd, dict):
        for wrapper in ("model", "state_dict"):
            if wrapper in sd and isinstance(sd[wrapper], dict):
                sd = sd[wrapper]
                break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{key}: {p} holds no state dict of tensors (expected a timm-layout state dict)")
    return sd


#: weight files looked for in a timm model's Hugging Face repo, in timm's order of preference.
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")


def hub_source(name: str, kwargs: dict) -> tuple[str, str | None, tuple[str, ...]] | None:
    """Where timm would fetch ``name``'s pretrained weights on the Hugging Face Hub.

    Returns:
        ``(repo_id, revision, filenames)`` from the model's pretrained cfg (``hf_hub_id`` ``"timm/<name>"``,
        revision after an ``@``, the cfg's ``hf_hub_filename`` first if set), or None when timm's own loader
        has to run: no ``hf_hub_id``, a local ``file``/``state_dict``/``local-dir`` source, a custom hub loader
        (``custom_load='hf'``), or a ``pretrained_cfg``/``pretrained_cfg_overlay`` in ``backbone.kwargs``.
    """
    from timm.models import get_pretrained_cfg

    if "pretrained_cfg" in kwargs or "pretrained_cfg_overlay" in kwargs:
        return None
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag: timm's create_model names it
        return None
    if (cfg is None or not cfg.hf_hub_id or cfg.file or cfg.state_dict or cfg.source == "local-dir"
            or cfg.custom_load == "hf"):
        return None
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    names = tuple(dict.fromkeys(([cfg.hf_hub_filename] if cfg.hf_hub_filename else []) + list(HUB_FILENAMES)))
    return repo_id, revision or None, names


def hub_file(name: str, repo_id: str, revision: str | None, filenames: tuple[str, ...]) -> Path:
    """The local path of ``repo_id``'s weights: from the Hugging Face cache, else downloaded (not when offline).

    The cache is ``huggingface_hub.constants.HF_HUB_CACHE`` (``$HF_HUB_CACHE``; a file placed by hand at
    ``models--timm--<name>/snapshots/<rev>/model.safetensors`` with ``refs/main`` holding ``<rev>`` counts).

    Raises:
        UserError: the file is not cached and ``HF_HUB_OFFLINE`` is set, or the download fails; one line naming
            the model, the expected cache path and ``backbone.checkpoint`` as the alternative.
    """
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    try:
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:  # huggingface_hub < 0.23
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    for fn in filenames:
        hit = try_to_load_from_cache(repo_id, fn, revision=revision)
        if isinstance(hit, str):
            return Path(hit)
    expected = (Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots" /
                (revision or "<rev>") / filenames[0])

    def missing(why: str) -> UserError:
        return UserError(f"backbone.pretrained: weights for {name!r} ({repo_id}) are not in the Hugging Face cache "
                         f"({why}); expected {expected}; put the file there (with refs/main naming <rev>) or set "
                         "backbone.checkpoint to a local weights file")

    if constants.HF_HUB_OFFLINE:
        raise missing("HF_HUB_OFFLINE is set")
    reason = "not found on the Hub"
    for fn in filenames:
        try:
            return Path(hf_hub_download(repo_id, fn, revision=revision))
        except LocalEntryNotFoundError as exc:  # no connection (a subclass of EntryNotFoundError: test it first)
            reason = f"download failed: {loader_error_line(exc)}"
            break
        except EntryNotFoundError:  # the repo has no such file: try the next name
            continue
        except Exception as exc:  # network, auth, disk: one line either way
            reason = f"download failed: {loader_error_line(exc)}"
            break
    raise missing(reason)
