"""Tensor-only loading of torch pickles, and the one-line refusal of a file that holds code.

``torch.load(weights_only=True)`` never runs what a file asks for, but its refusal message quotes advice to turn
the protection off. vptool never gives that advice: ``refusal`` names the global the file asks for (read from the
pickle's opcodes with ``pickletools``, which executes nothing) and says the file holds code as well as tensors.
"""

from __future__ import annotations

import io
import pickletools
import re
import zipfile
from pathlib import Path

#: modules a tensor file names (torch's rebuild functions, OrderedDict, argparse.Namespace): the global a refusal
#: names is the first one outside these
_TENSOR_MODULES = ("torch", "collections", "builtins", "_codecs", "argparse")


def _pickle_bytes(path: Path) -> bytes | None:
    """The pickle stream of a torch file: ``*/data.pkl`` of a zip archive, else the file itself."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                return zf.read(name) if name is not None else None
        return Path(path).read_bytes()
    except (OSError, zipfile.BadZipFile, KeyError, RuntimeError):
        return None


def pickle_globals(path: str | Path) -> list[str]:
    """The globals (``module.name``) a pickle file asks to import, in order, without unpickling anything.

    Reads the opcodes (``pickletools.genops``): ``GLOBAL`` / ``INST`` carry the name; ``STACK_GLOBAL`` takes the two
    strings pushed before it. A legacy torch file (several pickles in a row) is read up to its first ``STOP``.
    """
    data = _pickle_bytes(Path(path))
    if not data:
        return []
    found: list[str] = []
    pushed: list[str | None] = []  # what the last opcodes pushed: a string, or None for anything else
    memo: dict[int, str | None] = {}
    strings = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            name = op.name
            if name in ("GLOBAL", "INST") and isinstance(arg, str):
                found.append(arg.replace(" ", ".", 1))
                pushed.append(None)
            elif name in strings:
                pushed.append(str(arg))
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = pushed[-1] if pushed else None
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                pushed.append(memo.get(int(arg)))
            elif name == "STACK_GLOBAL":
                if len(pushed) >= 2 and pushed[-2] is not None and pushed[-1] is not None:
                    found.append(f"{pushed[-2]}.{pushed[-1]}")
                pushed.append(None)
            elif name == "STOP":
                break
            elif op.stack_after:
                pushed.append(None)
            del pushed[:-8]
    except Exception:  # a truncated or foreign stream: what was read so far
        pass
    return found


def _code_global(path: Path, exc: Exception) -> str | None:
    """The global a refused load asked for: the first global of the pickle outside the tensor modules (the code it
    would run), else the one torch names (``GLOBAL mod.name``)."""
    for g in pickle_globals(path):
        if not g.startswith(tuple(m + "." for m in _TENSOR_MODULES)):
            return g
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    m = re.search(r"GLOBAL ([\w.]+)", text)
    return m.group(1) if m else None


def is_refusal(exc: Exception) -> bool:
    """The error is ``torch.load(weights_only=True)`` (or numpy's ``allow_pickle=False``) refusing an object."""
    text = str(exc)
    return "Weights only load failed" in text or "WeightsUnpickler error" in text or "allow_pickle=False" in text


def refusal(path: str | Path, exc: Exception) -> str:
    """The refusal's text, without any advice to turn the protection off: ``asks to run code or load a
    non-tensor object (it imports posix.system): the file holds code as well as tensors ...``."""
    g = _code_global(Path(path), exc)
    if g:
        return (f"asks to run code or load a non-tensor object (it imports {g}): the file holds code as well as "
                "tensors, and vptool reads tensors only, never running what a file asks for")
    if "allow_pickle=False" in str(exc):
        return ("asks to run code or load a non-tensor object (pickled Python objects beside the arrays), which "
                "vptool never unpickles")
    m = re.search(r"Unsupported operand \d+|Unsupported class [\w.]+", str(exc))
    what = f": {m.group(0)}" if m else ""
    return (f"asks to run code or load a non-tensor object (a pickle the tensor-only reader cannot read{what}), "
            "which vptool never unpickles")


def torch_load(path: str | Path, what: str, fix: str, allow: tuple = ()):
    """``torch.load(path, map_location="cpu", weights_only=True)`` (``allow``: extra safe globals).

    Args:
        what: how the message names the file (``backbone.checkpoint: /path/x.pth``).
        fix: what the user can do, appended to the message.

    Raises:
        UserError: the file holds code or a non-tensor object (the global named), or cannot be read; one line.
    """
    import warnings

    import torch

    from vptool.errors import UserError

    try:
        with torch.serialization.safe_globals(list(allow)), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*pickle protocol", category=UserWarning)
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        if is_refusal(exc):
            raise UserError(f"{what} {refusal(path, exc)}; {fix}") from None
        raise
