"""The cache a synthesizer reads the workers' branches through, the way the shipped synthesizers were trained."""
from __future__ import annotations

from ..hf import ParallelCache
from .links import linked_cache
from .recompute import _branch_length

# Every shipped synthesizer was trained, and every figure of docs/FIDELITY.md measured, with the branches at
# the positions the text concatenation gives them.
SCHEME = "sequential"


def synthesizer_cache(model, prefix, branches, mapper=None, *, lengths=None, scheme: str = SCHEME,
                      backend: str = "auto") -> ParallelCache:
    """``ParallelCache(prefix, branches, scheme=scheme, mapper=mapper)``, or, for a mapper with link tokens,
    :func:`pskernels.synthesis.links.linked_cache` (which runs them now, with ``model``).

    Parameters
    ----------
    model : patched causal LM, or the PeftModel of the trained synthesizer
        Runs the link tokens, if the mapper has any (not used otherwise).
    prefix : transformers Cache
        The shared prefix (batch 1).
    branches : list of Cache or CacheRow
        The workers' caches, in text order.
    mapper : pskernels.synthesis.CacheMapper, optional
        The trained mapper (None: read the branches as they are).
    lengths : list of int, optional
        Real tokens of each branch (default: all it stores after the prefix).
    scheme : str
        Positions of the branches (:class:`pskernels.ParallelCache`); link tokens need ``"sequential"``.

    Returns
    -------
    ParallelCache
    """
    if getattr(mapper, "link_tokens", 0):
        if scheme != "sequential":
            raise ValueError(f"scheme: link tokens follow the branches in text order ('sequential'), got {scheme!r}")
        if lengths is None:
            lengths = [_branch_length(b, f"branches[{i}]") for i, b in enumerate(branches)]
        return linked_cache(model, prefix, branches, list(lengths), mapper, backend=backend)
    return ParallelCache(prefix, branches, scheme=scheme, branch_lengths=lengths, mapper=mapper, backend=backend)
