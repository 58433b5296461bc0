"""Synthesize from the workers' caches with a trained synthesizer, read the way it was trained: :class:`Synthesizer`.

A synthesizer is the model (with a checkpoint's LoRA adapter), its cache mapper, and how it reads the branches:
as the workers cached them (the default shipped synthesizer) or with the first tokens of each recomputed in text
order (the one shipped for fidelity, docs/FIDELITY.md). :class:`Synthesizer` loads one once and builds the cache
of any number of workflows the same way ``pskernels eval`` and ``pskernels demo`` do.
"""
from __future__ import annotations

import os
from pathlib import Path

from . import checkpoints
from .adapter import base_model
from .recompute import check_head_share, describe_recompute, recompute_branches
from .synthesizer import synthesizer_cache
from .workflow import cache_kwarg


class Synthesizer:
    """The synthesizer that reads the workers' branch caches: a trained checkpoint or the base model.

    Parameters
    ----------
    model : patched causal LM (``pskernels.patch_model``), or its PeftModel holding a synthesizer adapter
        The workers run its base weights (:meth:`base`), the synthesis runs it with the adapter.
    mapper : pskernels.synthesis.CacheMapper, optional
        The trained mapper the branches are read through (None: as cached). A mapper of
        :func:`pskernels.synthesis.calibration.calibrate_ape` is the training-free fallback for a model without a
        checkpoint.
    recompute : tuple, optional
        ``(head, tail, together)`` for a synthesizer trained on branches with those tokens recomputed in text order
        (:func:`pskernels.synthesis.recompute.recompute_branches`; head ``"prompt"``: each worker's instruction,
        given to :meth:`cache` as ``turns``). None: the branches are read as cached.
    head_share : float
        With ``recompute``: the head grows to at least that share of a long branch
        (:func:`pskernels.synthesis.recompute.grown_heads`).
    path : pathlib.Path, optional
        The checkpoint folder it was loaded from (:meth:`load`).

    Examples
    --------
    >>> import torch, pskernels
    >>> from pskernels.synthesis import Synthesizer
    >>> from pskernels.synthesis.models import tiny_llama
    >>> model = tiny_llama(seed=0)
    >>> handle = pskernels.patch_model(model)
    >>> synth = Synthesizer(model)                      # the base model; Synthesizer.load(model, "smollm2") for SmolLM2
    >>> ids = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (6, 5, 7)]
    >>> with torch.no_grad(), synth.base():             # the shared prefix and the workers: base weights
    ...     prefix = model(ids[0][None], use_cache=True).past_key_values
    ...     workers = [pskernels.ParallelCache(prefix, []) for _ in ids[1:]]
    ...     for w, b in zip(workers, ids[1:]):
    ...         _ = model(b[None], past_key_values=w)
    >>> out = synth.generate(torch.tensor([[1, 2, 3]]), prefix, workers, ids[1:], max_new_tokens=4, do_sample=False)
    >>> out.shape                                       # the prompt and 4 new tokens
    torch.Size([1, 7])
    >>> synth.cache(prefix, workers, ids[1:]).num_branches
    2
    >>> handle.remove()
    """

    def __init__(self, model, mapper=None, *, recompute: tuple | None = None, head_share: float = 0.0,
                 path: Path | None = None):
        if recompute is not None:
            if not isinstance(recompute, (tuple, list)) or len(recompute) != 3:
                raise ValueError(f"recompute: expected (head, tail, together) or None, got {recompute!r}")
            recompute = tuple(recompute)
        head_share = check_head_share(head_share)
        if head_share and recompute is None:
            raise ValueError(f"head_share: a head grows only where branches are recomputed (recompute=None), got "
                             f"{head_share}")
        self.model, self.mapper, self.recompute, self.head_share, self.path = model, mapper, recompute, head_share, path

    @classmethod
    def load(cls, model, checkpoint: str | os.PathLike, *, recompute: bool = False) -> "Synthesizer":
        """Load a checkpoint onto ``model`` (wrapping it in the checkpoint's adapter) after checking it was made for
        it, reading its branches as it was trained (its ``recompute`` setting and ``head_share``).

        Parameters
        ----------
        model : transformers.PreTrainedModel
            The plain base model (patched before or after).
        checkpoint : str or os.PathLike
            A model name with a shipped checkpoint (:data:`pskernels.synthesis.checkpoints.SHIPPED`, ``"smollm2"``),
            or a folder written by ``pskernels train --out`` or
            :func:`pskernels.synthesis.checkpoints.export_checkpoint`.
        recompute : bool
            With a model name: the synthesizer shipped for fidelity, trained on branches with their first tokens
            recomputed (:data:`pskernels.synthesis.checkpoints.SHIPPED_RECOMPUTE`); slower to the first token on
            short branches.

        Raises
        ------
        FileNotFoundError
            ``checkpoint`` is neither a shipped model name nor a checkpoint folder.
        ValueError
            A checkpoint of another model (the fingerprint fields that differ), or ``recompute`` with a folder
            (its training configuration says how it reads its branches).
        """
        shipped = checkpoints.SHIPPED_RECOMPUTE if recompute else checkpoints.SHIPPED
        if isinstance(checkpoint, str) and checkpoint in shipped:
            path = checkpoints.shipped_checkpoint(checkpoint, recompute=recompute)
            if path is None:
                raise FileNotFoundError(f"checkpoint: the files of the synthesizer shipped for {checkpoint!r} "
                                        f"({shipped[checkpoint]}) are not under {checkpoints.CHECKPOINT_ROOT}")
        else:
            path = Path(checkpoint)
            if recompute:
                raise ValueError(f"recompute: selects the synthesizer shipped for a model name "
                                 f"({sorted(checkpoints.SHIPPED_RECOMPUTE)}); the folder {str(path)!r} says itself "
                                 "how its synthesizer reads the branches")
            if not path.is_dir():
                raise FileNotFoundError(f"checkpoint: expected a model name with a shipped synthesizer "
                                        f"({sorted(checkpoints.SHIPPED)}) or a checkpoint folder, got {str(path)!r}")
        model, mapper = checkpoints.load_checkpoint(model, path)
        return cls(model, mapper, recompute=checkpoints.trained_recompute(path),
                   head_share=checkpoints.trained_head_share(path), path=Path(path))

    def base(self):
        """Context manager: the model without the synthesizer's adapter, for the shared prefix and the workers
        (PEFT's ``disable_adapter()``, which does not nest: :meth:`cache` and :meth:`generate` run outside it)."""
        return base_model(self.model)

    def cache(self, prefix, branches, branch_ids=None, *, lengths=None, turns=None):
        """The synthesizer's cache over the workers' branches, built as it was trained.

        Parameters
        ----------
        prefix : transformers Cache
            The shared prefix the workers ran on (batch 1).
        branches : list of Cache or CacheRow
            The workers' caches in text order (e.g. ``ParallelCache(prefix, [])`` after a worker's turn, or
            ``CacheRow(batched_worker_cache, i)``).
        branch_ids : list of 1-D int tensors, optional
            The token ids of each branch (its instruction and what it generated). Needed by a synthesizer that
            recomputes tokens of its branches; otherwise they give the branch lengths.
        lengths : list of int, optional
            Real tokens of each branch, where ``branch_ids`` are not given (default: all it stores).
        turns : list of int, optional
            Each worker's instruction length, for a synthesizer whose recomputed head is ``"prompt"``.

        Returns
        -------
        pskernels.ParallelCache
            Fresh for each call: a generation extends it.
        """
        branches = list(branches)
        if branch_ids is not None:
            branch_ids = list(branch_ids)
            if len(branch_ids) != len(branches):
                raise ValueError(f"branch_ids: expected one id tensor per branch ({len(branches)}), got "
                                 f"{len(branch_ids)}")
            ids_lengths = [int(t.numel()) for t in branch_ids]
            if lengths is not None and list(lengths) != ids_lengths:
                raise ValueError(f"lengths: expected the lengths of branch_ids {ids_lengths} (or None), got "
                                 f"{list(lengths)}")
            lengths = ids_lengths
        if self.recompute is None:
            return synthesizer_cache(self.model, prefix, branches, self.mapper, lengths=lengths)
        head, tail, together = self.recompute
        if branch_ids is None:
            raise ValueError(f"branch_ids: this synthesizer reads its branches with {self._how()}, and needs each "
                             "branch's token ids, got None")
        if head == "prompt":
            if turns is None or len(turns) != len(branches):
                raise ValueError(f"turns: this synthesizer recomputes each worker's instruction; expected one length "
                                 f"per branch ({len(branches)}), got {turns!r}")
            head = list(turns)
        with self.base():
            return recompute_branches(self.model, prefix, branches, branch_ids, head=head, tail=tail,
                                      together=together, mapper=self.mapper, head_share=self.head_share)

    def generate(self, input_ids, prefix, branches, branch_ids=None, *, lengths=None, turns=None, **generate_kwargs):
        """``model.generate(input_ids, ...)`` over :meth:`cache` (same arguments): the synthesis prompt's tokens
        and the answer, as Hugging Face ``generate`` returns them."""
        cache = self.cache(prefix, branches, branch_ids, lengths=lengths, turns=turns)
        return self.model.generate(input_ids, **{cache_kwarg(self.model): cache}, **generate_kwargs)

    def _how(self) -> str:
        over = " over the workers' K/V" if self.recompute[2] else ""
        return f"{describe_recompute(self.recompute, self.head_share)} recomputed{over}"

    def __repr__(self) -> str:
        src = f"checkpoint {str(self.path)!r}" if self.path is not None else "base model"
        reads = f"with {self._how()}" if self.recompute else "as cached"
        mapper = "a mapper" if self.mapper is not None else "no mapper"
        return f"Synthesizer({src}, {mapper}, branches read {reads})"
