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


class RowLayout:
    """Where each kind of row sits in one block's input: ``order`` (letters as above) and how many rows each
    letter holds, plus ``prefix`` deep-prompt keys/values in front of the keys (VPT-deep's prefix form).

    A backbone family reads it to place its position signal (``Family.block``): BEiT's relative position bias
    covers the C and X rows only, every pair involving a P or M row gets zero bias (VPTM §4).
    """

    __slots__ = ("order", "lengths", "prefix")

    def __init__(self, order: str, lengths: dict[str, int], prefix: int = 0):
        self.order, self.prefix = order, prefix
        self.lengths = {ch: lengths[ch] for ch in order}  # as given: sizes read off tensors stay traced sizes

    @property
    def key(self) -> tuple:
        """A hashable identity (order, row counts, prefix) for caching what depends on the layout."""
        return self.order, tuple(self.lengths.values()), self.prefix

    def slices(self) -> dict[str, slice]:
        """Row slices of each letter."""
        out, s = {}, 0
        for ch in self.order:
            out[ch] = slice(s, s + self.lengths[ch])
            s += self.lengths[ch]
        return out

    @property
    def rows(self) -> int:
        """T, the rows of the block's input."""
        return sum(self.lengths.values())
