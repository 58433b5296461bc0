"""Ship caches between processes over ``torch.distributed``: workers in other processes or on other machines.

Public API
----------
broadcast_prefix(cache_or_None, src, *, model, group=None, timeout=None) -> prefix cache on every rank
send_branch(worker_cache, dst, *, model, group=None, prefix_len=None, length=None, timeout=None) -> bytes sent
recv_branch(src, *, model, prefix, group=None, timeout=None) -> branch for ``ParallelCache(prefix, [...])``
recv_any(srcs, *, model, prefix, group=None, timeout=None) -> (src, branch), in the order workers finish
gather_branches(srcs, *, model, prefix, group=None, timeout=None) -> ({src: branch}, {src: why missing})
branch_bytes_per_token(model) -> bytes one branch token costs on the wire
BranchRefused (a ValueError with ``.rank``, ``.reason``), BranchTimeout (a TimeoutError with ``.ranks``)

One message per branch: an int64 header (format version, model fingerprint, rows, left pads, lengths, prefix
length, per-layer stored slots) announced on the group's store, then ONE contiguous payload with every layer's
K and V sent with ``dist.send`` (gloo for CPU tensors, NCCL for CUDA tensors). The receiver reads the payload in
place: the branch's layer K/V are views into the received buffer. Design and protocol: docs/DISTRIBUTED.md.

Every rank must have called ``torch.distributed.init_process_group`` (its default store is the control plane).
Ranks (``src``, ``dst``) are global ranks, as in ``torch.distributed``.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .._core.integers import int_scalar
from ..hf import CacheRow
from . import transport, wire
from .caches import branch_parts, build_branch, build_prefix, cut, prefix_parts
from .errors import BranchRefused, BranchTimeout
from .fingerprint import compare, fingerprint, model_dtype

__all__ = ["broadcast_prefix", "send_branch", "recv_branch", "recv_any", "gather_branches", "branch_bytes_per_token",
           "BranchRefused", "BranchTimeout"]


def _prefix_len(prefix) -> int:
    return max((layer.get_seq_length() for layer in prefix.layers), default=0) if prefix is not None else 0


def _device(model, cache):
    """Where ``cache`` (a prefix, a worker's cache or a CacheRow of one) holds its K/V; else the model's device."""
    cache = cache.cache if isinstance(cache, CacheRow) else cache
    for layer in getattr(cache, "layers", ()):  # anything else is refused by name where it is read
        if getattr(layer, "keys", None) is not None and layer.keys.ndim == 4:
            return layer.keys.device
    return next(model.parameters()).device


def _check_peer(name: str, rank, group) -> int:
    """``rank`` as an int, or a ValueError naming ``name`` unless it is another rank of ``group`` (a message to a rank
    outside the group, or to this one, would wait forever)."""
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    try:
        r = int_scalar(name, rank)
    except TypeError:
        r = None
    if r not in ranks:
        raise ValueError(f"{name}: expected a global rank of the group {ranks}, got {rank!r}")
    if r == dist.get_rank():
        raise ValueError(f"{name}: expected another rank than this one ({r})")
    return r


def _judge(h: wire.Header, model, kind: int, prefix_len: int | None) -> str | None:
    if h.kind != kind:
        return f"kind: sender {wire.KINDS[h.kind]}, receiver expects {wire.KINDS[kind]}"
    diff = compare(h.fingerprint, fingerprint(model))
    if diff is not None:
        return f"model fingerprint differs: {diff}"
    if prefix_len is not None and h.prefix_len != prefix_len:
        return f"prefix length: sender {h.prefix_len}, receiver {prefix_len}"
    return None


def send_branch(worker_cache, dst: int, *, model, group=None, prefix_len=None, length=None, timeout=None) -> int:
    """Send one worker's branch cache to rank ``dst`` (one header + one payload).

    Parameters
    ----------
    worker_cache : ParallelCache, CacheRow or transformers Cache
        A worker's zero-copy ``ParallelCache(prefix, [])`` (``B`` rows, left padding kept), ``CacheRow(cache, i)``
        (row ``i`` of one, sent as a batch-1 branch) or an ordinary ``[prefix | branch]`` cache (e.g.
        ``copy.deepcopy(prefix)`` extended by the worker; needs ``prefix_len``; a sliding-window layer sends the
        slots it still stores). Keys/values ``[B, kv_heads, T, head_dim]`` of the model's dtype.
    dst : int
        Global rank of the receiver (it calls :func:`recv_branch` or :func:`recv_any`): another rank of ``group``
        (anything else raises ValueError before anything is announced).
    model : transformers PreTrainedModel
        The model the worker ran; its fingerprint goes into the header.
    group : ProcessGroup, optional
        Default: the world group.
    prefix_len : int, optional
        Prefix tokens of an ordinary cache (a ParallelCache knows its own).
    length : int or [B] ints, optional
        Real tokens per row after the left pad (ParallelCache / CacheRow only): trailing slots beyond every row's
        last real token are not sent (e.g. a worker's generated tokens past its EOS).
    timeout : float or timedelta, optional
        Seconds to wait for the receiver's verdict (default: forever). On expiry the branch is withdrawn (the
        receiver skips it) and TimeoutError is raised; the group stays usable.

    Returns
    -------
    int
        Payload bytes sent.

    Raises
    ------
    BranchRefused (ValueError)
        The receiver refused the header (other model, dtype, format version or prefix length: the message names
        the field and both values); nothing was sent and the group stays usable. Also for a malformed cache.
    BranchTimeout (TimeoutError)
        No verdict within ``timeout``.
    """
    dst = _check_peer("dst", dst, group)
    fp = fingerprint(model)
    h, kv, pieces = branch_parts(worker_cache, fp, prefix_len=prefix_len, length=length, views=False)
    h, pieces = cut(h, pieces, transport.message_bytes(_device(model, worker_cache), h.payload_bytes))
    if kv is not None:  # a token-major header (no views) was read off the very buffer that is sent
        wire.check_layers(h, kv)
    base = transport.announce(wire.encode(h), dst, group)
    verdict = transport.await_verdict(base, dst, timeout)
    if verdict != "ok":
        why = verdict.removeprefix("reject:")
        raise BranchRefused(f"send_branch: rank {dst} refused the branch: {why}", rank=dst, reason=why)
    # Each piece leaves straight from the cache (a byte view, no packing copy: one per row of a token-major worker
    # buffer, else one per layer's K and V) and lands in its place in the receiver's one payload buffer.
    transport.send_payload(pieces, dst, group, base)
    return h.payload_bytes


def recv_any(srcs, *, model, prefix, group=None, timeout=None):
    """Receive the first branch announced by any of ``srcs`` (branches in the order workers finish).

    Parameters
    ----------
    srcs : sequence of int
        Global ranks of the senders to wait for: other ranks of ``group`` (anything else raises ValueError before
        anything is read).
    model : transformers PreTrainedModel
        The synthesizer's model: a branch whose fingerprint differs is refused.
    prefix : transformers Cache or None
        The synthesizer's prefix cache (the received branch is built on it; its length must equal the length of
        the prefix the branch continued).
    group : ProcessGroup, optional
    timeout : float or timedelta, optional
        Seconds to wait for an announcement (default: forever).

    Returns
    -------
    (int, Cache)
        The sender's rank and its branch, ready for ``ParallelCache(prefix, [branch, ...])``: a zero-copy
        ``ParallelCache(prefix, [])`` whose own tokens are the branch (or, when a sliding layer of an ordinary
        cache dropped slots, an ordinary cache of the branch's stored slots). Every layer's ``keys``/``values``
        ``[B, kv_heads, S, head_dim]`` is a view into the one received buffer. ``branch.lengths`` ([B] int64) are
        the real tokens per row; pass them as ``branch_lengths`` when the rows of a multi-row branch differ.
        ``branch.payload_bytes``, ``branch.recv_seconds`` (the payload receive, after the verdict, with the
        branch's views built meanwhile) and ``branch.received_at`` (``time.perf_counter()`` when it was complete)
        are there for reports.

    Raises
    ------
    BranchTimeout (TimeoutError)
        No branch announced within ``timeout``: names the ranks (``.ranks``). Nothing was posted; call again
        to keep waiting.
    BranchRefused (ValueError)
        The announced header was refused (``.rank``; ``.reason``: the field and both values; the sender gets
        the same reason and sends nothing); its sender's next branch can still be received.
    """
    srcs = [_check_peer("srcs", s, group) for s in srcs]
    if not srcs:
        raise ValueError("srcs: expected at least one rank")
    t = transport._seconds(timeout)
    deadline = None if t is None else time.monotonic() + t
    while True:
        src, base, raw = transport.next_announced(srcs, group, deadline, t)
        try:
            h = wire.decode(raw)
            why = _judge(h, model, wire.BRANCH, _prefix_len(prefix))
        except ValueError as e:
            why = str(e)
        if why is not None:
            transport.decide(base, "reject:" + why)
            raise BranchRefused(f"recv_branch: refused the branch of rank {src}: {why}", rank=src, reason=why)
        if not transport.decide(base, "ok"):
            continue  # the sender withdrew it (its own timeout): wait for the next one
        t0 = time.perf_counter()
        buf, works = transport.post_payload(h.payload_bytes, h.ranges(), src, group, _device(model, prefix))
        try:  # the branch's views are built while the bytes move (they do not read them)
            branch = build_branch(h, buf, prefix)
        finally:  # never leave a receive posted
            transport.wait_payload(works)
        if buf.is_cuda:
            torch.cuda.synchronize(buf.device)
        branch.received_at = time.perf_counter()
        branch.payload_bytes, branch.recv_seconds = h.payload_bytes, branch.received_at - t0
        return src, branch


def gather_branches(srcs, *, model, prefix, group=None, timeout=None):
    """One branch from each of ``srcs``, taken in the order the workers finish, within ``timeout`` seconds in all:
    a synthesizer that goes on with the branches it has.

    Parameters
    ----------
    srcs : iterable of int
        Global ranks of the workers, each sending one branch (distinct).
    model, prefix, group
        As for :func:`recv_any`.
    timeout : float or timedelta, optional
        Seconds for all of them (default: forever). Branches announced after it stay announced: a later
        :func:`recv_branch` from that rank takes them.

    Returns
    -------
    (dict, dict)
        ``{src: branch}`` in arrival order (each as :func:`recv_any` returns it; ``branch.received_at`` tells when)
        and ``{src: why}`` for the others: ``"refused: <field and both values>"`` (the sender got the same reason
        and sent nothing) or ``"timeout: no branch within <t> s"``.

    Examples
    --------
    ::

        branches, missing = psd.gather_branches(range(1, world), model=model, prefix=prefix, timeout=60)
        cache = pskernels.ParallelCache(prefix, [branches[r] for r in sorted(branches)])
    """
    pending = list(srcs)
    if len(set(pending)) != len(pending):
        raise ValueError(f"srcs: expected distinct ranks, got {pending}")
    pending = [_check_peer("srcs", s, group) for s in pending]
    t = transport._seconds(timeout)
    deadline = None if t is None else time.monotonic() + t
    got, missing = {}, {}
    while pending:
        try:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            src, branch = recv_any(pending, model=model, prefix=prefix, group=group, timeout=left)
        except BranchRefused as e:
            pending.remove(e.rank)
            missing[e.rank] = f"refused: {e.reason}"
            continue
        except BranchTimeout as e:
            missing.update((r, f"timeout: no branch within {t:g} s") for r in e.ranks)
            break
        pending.remove(src)
        got[src] = branch
    return got, missing


def recv_branch(src: int, *, model, prefix, group=None, timeout=None):
    """Receive rank ``src``'s next branch; ``recv_any([src], ...)[1]`` (see :func:`recv_any`).

    Examples
    --------
    Rank 0 synthesizes from the branches of ranks 1..N-1 (each ran ``send_branch(worker, 0, model=model)``)::

        prefix = psd.broadcast_prefix(prefix if rank == 0 else None, 0, model=model)
        branches = [psd.recv_branch(r, model=model, prefix=prefix, timeout=30) for r in range(1, world)]
        cache = pskernels.ParallelCache(prefix, branches)
        out = model.generate(query_ids, past_key_values=cache, max_new_tokens=32)
    """
    return recv_any([_check_peer("src", src, group)], model=model, prefix=prefix, group=group, timeout=timeout)[1]


def broadcast_prefix(cache_or_None, src: int, *, model, group=None, timeout=None):
    """Rank ``src`` sends its prefix cache to every other rank of ``group`` (a collective: all ranks call it).

    Parameters
    ----------
    cache_or_None : transformers Cache or None
        On ``src``: the prefix cache (an ordinary cache, e.g. the prefill's ``past_key_values``). Ignored elsewhere.
    src : int
        Global rank of the source.
    model : transformers PreTrainedModel
        Each rank's model: a rank whose fingerprint differs refuses, and then every rank raises.
    group : ProcessGroup, optional
    timeout : float or timedelta, optional
        Seconds to wait for the header, the verdicts and the decision (default: forever).

    Returns
    -------
    transformers.DynamicCache
        On ``src`` its own cache; elsewhere a ``DynamicCache`` with the source's layer classes (sliding-window
        layers too) whose K/V are views into the received buffer: an ordinary cache workers run on, e.g. as
        ``ParallelCache(prefix, [])``.

    Raises
    ------
    ValueError
        A rank refused the header (named with its reason); no payload was broadcast, on any rank.
    TimeoutError
        A rank did not answer within ``timeout``.
    """
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    me = dist.get_rank()
    if src not in ranks:
        raise ValueError(f"src: rank {src} is not in the group {ranks}")
    base = transport.bcast_keys(group)
    if me == src:
        h, kv = prefix_parts(cache_or_None, fingerprint(model))
        buf = wire.pack(h, kv)
        why = transport.bcast_publish(base, wire.encode(h), [r for r in ranks if r != src], timeout)
        if why is not None:
            raise ValueError(f"broadcast_prefix: refused: {why}")
        dist.broadcast(buf, src, group=group)
        return cache_or_None
    raw = transport.bcast_header(base, src, timeout)
    try:
        h = wire.decode(raw)
        why = _judge(h, model, wire.PREFIX, None)
    except ValueError as e:
        why = str(e)
    decision = transport.bcast_answer(base, "ok" if why is None else "reject:" + why, src, timeout)
    transport.bcast_done(base, len(ranks) - 1)
    if why is not None:
        raise ValueError(f"broadcast_prefix: refused the prefix of rank {src}: {why}")
    if decision != "go":
        raise ValueError(f"broadcast_prefix: aborted by rank {src}: {decision.removeprefix('abort:')}")
    buf = transport.payload_pool.take(h.payload_bytes, _device(model, None))
    dist.broadcast(buf, src, group=group)
    return build_prefix(h, wire.unpack(h, buf))


def branch_bytes_per_token(model, dtype=None) -> int:
    """Wire bytes per branch token and row: ``2 x sum over layers of kv_heads x head_dim x dtype size``."""
    fp = fingerprint(model, dtype)
    el = torch.empty(0, dtype=dtype or model_dtype(model)).element_size()
    return sum(2 * kv * hd * el for kv, hd, *_ in fp.layers)
