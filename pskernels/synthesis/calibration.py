"""Training-free fallback for models without a trained synthesizer: APE-style calibration, fitted per model.

APE (adaptive parallel encoding) reads parallel branch caches unchanged but rescales how the synthesizer's
attention treats them: a temperature ``T`` sharpens the attention over the branch tokens and an LSE scale
``S`` down-weights the branches' share against the prefix and the synthesizer's own tokens (the knobs of
:class:`~pskernels.synthesis.mapper.CacheMapper` with ``calibrate=True``; the cache transform stays the
identity). The fixed choice ``T = S = 0.9`` is the ``ape`` setting of :mod:`pskernels.synthesis.evaluate`.

:func:`calibrate_ape` picks ``(T, S)`` for one model by a short grid search: on a few (training) examples it
measures the token-weighted KL(text concatenation || parallel synthesis with ``(T, S)``) on the teacher's
targets (the example's ``target``, else the teacher's greedy continuation), exactly as the evaluation does,
and returns a ready-to-use mapper at the grid point with the lowest KL (the first one on ties). The default
grid contains ``T = S = 1`` (the untrained parallel setting), so on the calibration examples the result is
never worse than no calibration::

    from pskernels.synthesis.calibration import calibrate_ape
    mapper, report = calibrate_ape(model, tokenizer)   # builds 8 training-family workflows with the model itself
    cache = pskernels.ParallelCache(prefix, branches, mapper=mapper)   # the synthesizer reads through it

Command line: ``pskernels eval --calibrate-ape [FILE]`` (:mod:`pskernels.apps.evaluate`).
"""
from __future__ import annotations

from itertools import product

import torch

from .distill import Tally, TargetCache, eos_ids, patched, student_logits, teacher_pass, tokenize_examples
from .evaluate import ape_mapper
from .mapper import CacheMapper

DEFAULT_TEMPERATURES = (0.7, 0.8, 0.9, 1.0)
DEFAULT_LSE_SCALES = (0.7, 0.8, 0.9, 1.0)


def ape_grid(temperatures=DEFAULT_TEMPERATURES, lse_scales=DEFAULT_LSE_SCALES) -> list:
    """Every ``(temperature, lse_scale)`` pair of the two lists (temperature-major)."""
    return [(float(t), float(s)) for t, s in product(temperatures, lse_scales)]


DEFAULT_GRID = tuple(ape_grid())


def _check_grid(grid) -> list:
    if grid is None:
        raise ValueError("grid: expected at least one (temperature, lse_scale) point, got None")
    points = []
    for p in grid:
        try:
            t, s = (float(x) for x in p)
        except (TypeError, ValueError):
            raise ValueError(f"grid: each point must be a (temperature, lse_scale) pair of numbers, "
                             f"got {p!r}") from None
        if not (t > 0 and s > 0):
            raise ValueError(f"grid: temperature and lse_scale must be > 0, got {(t, s)}")
        points.append((t, s))
    if not points:
        raise ValueError("grid: expected at least one (temperature, lse_scale) point, got an empty grid")
    return points


def calibration_examples(model, tokenizer, n: int | None = 8, *, seed: int = 1, worker_tokens: int = 48) -> list:
    """The first ``n`` (None: one per family) training-family workflows of ``seed``, the model playing the
    workers (:func:`pskernels.synthesis.workflows.build_workflows`, round-robin over the families)."""
    from .families import TRAIN_FAMILIES
    from .workflows import build_workflows

    n = len(TRAIN_FAMILIES) if n is None else n
    return build_workflows(model, tokenizer, "train", -(-n // len(TRAIN_FAMILIES)), seed=seed,
                           worker_tokens=worker_tokens)[:n]


@torch.no_grad()
def calibrate_ape(model, tokenizer, examples=None, *, grid=DEFAULT_GRID, scheme: str = "sequential",
                  target_tokens: int = 16, max_examples: int | None = 8, seed: int = 1,
                  worker_tokens: int = 48) -> tuple[CacheMapper, dict]:
    """Choose the APE temperature ``T`` and LSE scale ``S`` for ``model`` by a grid search; one call.

    Parameters
    ----------
    model, tokenizer
        The base model (a PeftModel runs with its adapter disabled) and its tokenizer.
    examples
        A few examples in the :mod:`pskernels.synthesis.data` format (dicts or ``TokenizedExample``), from
        the *training* distribution: never the examples the calibrated mapper is then evaluated on.
        ``None``: ``max_examples`` (default 8) workflow examples of the training families, the model itself
        playing the workers (:func:`pskernels.synthesis.workflows.build_workflows` with ``seed`` and
        ``worker_tokens``; about 10 s each for SmolLM2-135M on 2 CPU cores).
    grid
        ``(temperature, lse_scale)`` pairs to try (default: :data:`DEFAULT_GRID`, 4 x 4 values in
        ``0.7..1.0``; :func:`ape_grid` builds others).
    scheme
        Branch position scheme of the ``ParallelCache`` (as in the evaluation).
    target_tokens
        Length of the teacher's greedy continuation scored on examples without ``target``.
    max_examples
        Use at most this many of ``examples`` (None: all).
    seed, worker_tokens
        How the examples are built when ``examples`` is None.

    Returns
    -------
    (CacheMapper, dict)
        The mapper at the best point (rank-1 identity transform, ``calibrate=True``, log-weight 0), and a
        report ``{"temperature", "lse_scale", "kl", "top1", "grid": [{"temperature", "lse_scale", "kl",
        "top1"}, ...], "examples", "tokens", "scheme"}`` (KL in nats/token, token-weighted).

    Raises
    ------
    ValueError
        ``grid`` empty or with a non-positive value; ``examples`` empty (not None).
    """
    points = _check_grid(grid)
    if examples is None:
        examples = calibration_examples(model, tokenizer, max_examples, seed=seed, worker_tokens=worker_tokens)
    examples = list(examples)
    if max_examples is not None:
        examples = examples[:max_examples]
    if not examples:
        raise ValueError("examples: expected at least one example to calibrate on, got none")
    dev = next(model.parameters()).device
    exs = tokenize_examples(tokenizer, examples, dev)
    targets = TargetCache(target_tokens, eos_ids(tokenizer))
    was_training = model.training
    model.eval()
    rows = []
    try:
        with patched(model):
            passes = [teacher_pass(model, ex, targets, j) for j, ex in enumerate(exs)]
            tokens = sum(p.target_ids.numel() for p in passes)
            for t, s in points:
                mapper = ape_mapper(model, init_temperature=t, init_lse_scale=s).to(dev)
                tally = Tally()
                for ex, p in zip(exs, passes):
                    logits = student_logits(model, ex, p.prefix, p.branches, p.target_ids, mapper=mapper,
                                            scheme=scheme, adapter=False)
                    tally.add([None], p.teacher_logits, logits)
                m = tally.metrics(None)
                rows.append({"temperature": t, "lse_scale": s, "kl": m["kl"], "top1": m["top1"]})
    finally:
        model.train(was_training)
    best = min(range(len(rows)), key=lambda i: rows[i]["kl"])
    b = rows[best]
    mapper = ape_mapper(model, init_temperature=b["temperature"], init_lse_scale=b["lse_scale"]).to(dev)
    report = {"temperature": b["temperature"], "lse_scale": b["lse_scale"], "kl": b["kl"], "top1": b["top1"],
              "grid": rows, "examples": len(exs), "tokens": tokens, "scheme": scheme}
    return mapper, report
