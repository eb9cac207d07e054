"""Token order strings (no torch): which rows a prompted sequence holds and in what order.

Letters: ``C`` class/prefix tokens, ``X`` patch tokens, ``P`` prompt rows, ``M`` the [MASK] token (VPTM eq. 6).
``C`` comes first. Default ``CPX`` (VPT eq. 4), or ``CXPM`` with a [MASK] token (VPTM; Table 5 also uses
``CXMP``, ``CPMX``, ``CMPX``).
"""

from __future__ import annotations


def order_letters(has_prompts: bool, has_mask: bool) -> set[str]:
    """The letters a sequence holds: C and X always, P with prompts, M with a [MASK] token."""
    return {"C", "X"} | ({"P"} if has_prompts else set()) | ({"M"} if has_mask else set())


def default_order(has_prompts: bool, has_mask: bool) -> str:
    """``CPX`` without a [MASK] token, ``CXPM`` with one, keeping only the letters present."""
    letters = order_letters(has_prompts, has_mask)
    return "".join(ch for ch in ("CXPM" if has_mask else "CPX") if ch in letters)


def order_problem(order: str, has_prompts: bool, has_mask: bool) -> str | None:
    """One line naming ``tokens.order`` and the fix when ``order`` is not a valid order, else None."""
    letters = order_letters(has_prompts, has_mask)
    if sorted(order) == sorted(letters) and order.startswith("C"):
        return None
    return (f"tokens.order: {order!r} must start with C and use each of {''.join(sorted(letters))} once "
            f"(C class token, X patches, P prompts, M [MASK]), e.g. {default_order(has_prompts, has_mask)}")
