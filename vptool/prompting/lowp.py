"""Frozen backbone weights stored in low precision (``backbone.dtype``: bf16 or fp16), computed in fp32 or autocast.

Storage: every frozen floating-point parameter of the backbone (``requires_grad`` False) is cast to the storage
dtype, which halves the backbone's memory; trainable tensors (prompts, head, gates, temperature, a tuned patch
embedding) and so their gradients and optimizer state stay fp32, and the adapter file is unchanged. Buffers stay
as they are (index tables, small).

Compute: the prompted forward reads many weights directly (``attention.prompted_attention`` takes
``attn.qkv.weight``), so per-module hooks would miss them. Instead ``upcast(module)`` is a context around one
piece of the forward (the embedding, one block, the readout norm): inside it the piece's low-precision
parameters are replaced by compute-dtype copies, and the stored ones put back on exit.

- Under an autocast whose dtype is the storage dtype (bf16 weights under ``train.precision`` bf16 on CUDA, the
  fast path) nothing is copied: autocast runs matmuls in bf16 and promotes what it computes in fp32 (norms).
- Everywhere else (the CPU, where bf16 matmuls without AVX-512 bf16 are ~100x slower, or fp32 compute on CUDA)
  the weights are upcast to fp32 one block at a time, so results equal an fp32 run on the rounded weights, and
  only one block's fp32 copy exists at a time: what autograd saves of a copy for the backward pass is saved as
  the stored tensor (saved-tensor hooks) and upcast again when that block's backward runs.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def store_frozen(module: nn.Module, dtype: torch.dtype) -> int:
    """Cast ``module``'s frozen floating-point parameters to ``dtype`` in place; returns how many were cast."""
    n = 0
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                m._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
                n += 1
    return n


def _compute_dtype(stored: torch.dtype, device: torch.device) -> torch.dtype | None:
    """The dtype to upcast ``stored`` weights to on ``device``, or None when autocast already computes in it."""
    kind = device.type
    if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == stored:
        return None
    return torch.float32


@contextlib.contextmanager
def upcast(module: nn.Module, low: torch.dtype | None, skip: tuple[nn.Module, ...] = (), saved_low: bool = True):
    """Inside the context, ``module``'s parameters stored in ``low`` are fp32 copies (see the module doc);
    ``skip``'s subtrees are left as stored. A no-op for ``low`` None (fp32 storage) or under ``low`` autocast.

    With ``saved_low`` (and grad enabled) what autograd saves of a copy for the backward pass (a weight, or a view
    of it such as ``W.t()``) is saved as the stored low-precision tensor and upcast again when the backward needs
    it, so no fp32 copy outlives the context. Off inside an activation checkpoint, which saves nothing anyway.
    """
    if low is None:
        yield
        return
    skipped = {id(m) for s in skip for m in s.modules()}
    swapped = []
    for m in module.modules():
        if id(m) in skipped:
            continue
        for name, p in m._parameters.items():
            if p is None or p.dtype != low:
                continue
            to = _compute_dtype(low, p.device)
            if to is None:
                continue
            m._parameters[name] = nn.Parameter(p.to(to), requires_grad=False)
            swapped.append((m, name, p))
    hooks = contextlib.nullcontext()
    if swapped and saved_low and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        hooks = _saved_as_stored({_storage(m._parameters[name]): p for m, name, p in swapped})
    try:
        with hooks:
            yield
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


def _storage(t: torch.Tensor) -> int | None:
    """The address of ``t``'s storage, or None where it has none worth matching (meta, fake or zero-sized)."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return ptr or None


def _saved_as_stored(stored: dict[int, torch.Tensor]):
    """Saved-tensor hooks: a saved tensor living in the storage of an fp32 copy (keys: ``_storage`` of each copy)
    is packed as the stored tensor it was copied from plus the view's geometry, and unpacked by upcasting again."""

    def pack(t: torch.Tensor):
        ptr = _storage(t)
        src = stored.get(ptr) if ptr is not None else None
        if src is None or t.device != src.device:
            return t
        return (src, t.dtype, t.size(), t.stride(), t.storage_offset())

    def unpack(packed):
        if isinstance(packed, tuple):
            src, dtype, size, stride, offset = packed
            return src.to(dtype).as_strided(size, stride, offset)
        return packed

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def stored_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers as stored."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
