"""The exceptions of pskernels.distributed: ordinary ValueError / TimeoutError that also carry the rank(s)."""
from __future__ import annotations


class BranchRefused(ValueError):
    """A header was refused (other model, dtype, format version, prefix length, malformed). ``rank``: the peer
    (the sender on the receiving side, the receiver on the sending side); ``reason``: the field and both values."""

    def __init__(self, message: str, *, rank: int, reason: str):
        super().__init__(message)
        self.rank, self.reason = rank, reason


class BranchTimeout(TimeoutError):
    """Nothing arrived in time. ``ranks``: the peers waited for; nothing was posted, the group is usable."""

    def __init__(self, message: str, *, ranks):
        super().__init__(message)
        self.ranks = list(ranks)
