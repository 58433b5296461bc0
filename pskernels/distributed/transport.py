"""Moving cache messages between processes: the control plane on the group's store, the data on the group.

Keys (``ns`` = ``pskv/<group name>``; ``s``/``d`` global ranks; ``n`` the ``s -> d`` sequence number)::

    ns/q/d         the announcements to d, a store queue (value ``b"s n\n" + header``), so a receiver can wait
                   for the first of several senders with one store.wait; popped by the receiver. Stores without
                   queues (FileStore, TCPStore's legacy backend) take numbered keys instead: ns/q/d/k, the k-th
                   announcement (counter ns/q/d/count), deleted by the receiver once read
    ns/b/s/d/n/a   the verdict, written once (store.compare_set: first writer wins):
                   "ok" / "reject:<why>" by the receiver, or "withdrawn" by a sender that stopped waiting

A sender announces, waits for the verdict and sends the payload only after "ok"; a receiver waits on the
store (with its timeout), judges the header, and posts the receive only for a branch it accepted. A timed-out
store.wait leaves the group untouched; no receive is ever left posted.
"""
from __future__ import annotations

import time
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import BranchTimeout

_LONG = timedelta(days=365)


class _State:
    """This process's protocol state in one process group: sequence numbers and announcements seen."""

    def __init__(self):
        self.sent = {}  # d -> next n to send to rank d
        self.taken = {}  # s -> next n to receive from rank s
        self.cursor = 0  # numbered announcement keys read (stores without queues)
        self.announced = {}  # (s, n) -> header read from the queue, not yet taken
        self.bcast = 0  # broadcasts done
        self.queues = None  # whether the store has queues (asked once)


# One state per process group object, so that a group made anew (destroy_process_group + init_process_group, e.g.
# to replace a dead worker) starts from sequence number 0 on every rank, old and new processes alike.
_states = weakref.WeakKeyDictionary()
_spent = []  # announcement keys read, to delete once the current payload has moved


def _state(group) -> _State:
    g = group if group is not None else dist.group.WORLD
    st = _states.get(g)
    if st is None:
        st = _states[g] = _State()
    return st


def _ns(group) -> str:
    g = group if group is not None else dist.group.WORLD
    return f"pskv/{dist.distributed_c10d._get_process_group_name(g)}"


def _store():
    return dist.distributed_c10d._get_default_store()


def _rank() -> int:
    return dist.get_rank()


def _seconds(timeout) -> float | None:
    if timeout is None:
        return None
    try:
        t = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
    except (TypeError, ValueError):
        t = None
    if isinstance(timeout, bool) or t is None or not t >= 0:  # NaN too
        raise ValueError(f"timeout: expected seconds >= 0, a timedelta or None, got {timeout!r}")
    return t


def _wait(store, key: str, deadline: float | None) -> bool:
    """Wait for ``key`` until ``deadline`` (time.monotonic(); None: forever). False on timeout."""
    while True:
        if deadline is None:
            left = _LONG
        else:
            left = timedelta(seconds=deadline - time.monotonic())
            if left.total_seconds() <= 0:
                return store.check([key])
        try:
            store.wait([key], max(left, timedelta(milliseconds=1)))  # returns at once for a key already set
            return True
        except RuntimeError as e:
            if not _timed_out(e):
                raise
            if deadline is not None and time.monotonic() >= deadline:
                return store.check([key])


def _timed_out(e: RuntimeError) -> bool:
    """A store.wait that timed out: TCPStore raises DistStoreError, FileStore a plain RuntimeError("Wait timeout");
    anything else (a lost connection to the store: DistNetworkError) is not a timeout."""
    return isinstance(e, dist.DistStoreError) or (type(e) is RuntimeError and "timeout" in str(e).lower())


def _read(store, key: str) -> bytes:
    """The value of a key known to exist, in one round trip: ``store.get`` waits for the key first (two; 100-110 us
    here against 65 us). A compare_set whose expected value no key of ours holds returns the value unchanged."""
    return store.compare_set(key, "\x00", "\x00")


def _await(store, key: str, deadline: float | None) -> bytes | None:
    """The value of ``key`` once it is set (before ``deadline``, as :func:`_wait`), else None."""
    return _read(store, key) if _wait(store, key, deadline) else None


def _pop(store, queue: str, deadline: float | None) -> bytes | None:
    """The first entry of the store queue ``queue`` once it has one (before ``deadline``, as :func:`_wait`), else
    None. (``store.queue_pop(block=True)`` would wait with the store's own timeout, not ours.)"""
    while _wait(store, queue, deadline):  # a queue "exists" while it holds an entry
        try:
            return store.queue_pop(queue, False)
        except dist.QueueEmptyError:  # another reader of this queue took the entry first: wait for the next
            continue
    return None


def _has_queues(store, group) -> bool:
    """Whether the store has queues (TCPStore's libuv backend: the default of ``torchrun`` and ``tcp://``; not
    FileStore nor TCPStore's legacy backend); asked once per group."""
    st = _state(group)
    if st.queues is None:
        try:
            store.queue_len(f"{_ns(group)}/q/probe")
            st.queues = True
        except NotImplementedError:
            st.queues = False
    return st.queues


def announce(header: bytes, dst: int, group) -> str:
    """Sender: publish ``header`` for ``dst`` (in the queue entry itself); returns the base of this message's keys."""
    store, ns, src, st = _store(), _ns(group), _rank(), _state(group)
    n = st.sent.get(dst, 0)
    st.sent[dst] = n + 1
    entry = f"{src} {n}\n".encode() + header
    if _has_queues(store, group):
        # one message, no reply awaited: a sender killed at any point has announced all or nothing
        store.queue_push(f"{ns}/q/{dst}", entry)
    else:
        # a numbered key: a sender killed between these two writes leaves key k missing, and the receiver, which
        # reads the keys in order, waits on it until each call's timeout (docs/DISTRIBUTED.md, "Limits")
        k = store.add(f"{ns}/q/{dst}/count", 1)
        store.set(f"{ns}/q/{dst}/{k}", entry)
    return f"{ns}/b/{src}/{dst}/{n}"


def await_verdict(base: str, dst: int, timeout) -> str:
    """Sender: "ok", or "reject:<why>"; raises TimeoutError (and withdraws the branch) after ``timeout`` s."""
    store = _store()
    t = _seconds(timeout)
    verdict = _await(store, f"{base}/a", None if t is None else time.monotonic() + t)
    if verdict is None:  # first writer wins: our withdrawal, or the receiver's verdict written meanwhile
        verdict = store.compare_set(f"{base}/a", "", "withdrawn")
        if verdict == b"withdrawn":  # the receiver deletes the keys when it comes to this announcement
            raise BranchTimeout(f"send_branch: rank {dst} did not take the branch within {t:g} s (withdrawn; the "
                                "group is usable)", ranks=[dst])
    verdict = verdict.decode()
    if verdict != "ok":
        store.delete_key(f"{base}/a")
    return verdict  # "ok": the caller sends the payload (send_payload releases the verdict key meanwhile)


def next_announced(srcs, group, deadline: float | None, t: float | None) -> tuple:
    """Receiver: ``(src, base, header bytes)`` of the first branch announced by any of ``srcs`` before ``deadline``
    (time.monotonic(); None: forever); ``t`` is the caller's timeout, for the message."""
    store, ns, me, st = _store(), _ns(group), _rank(), _state(group)
    seen = st.announced
    while True:
        for s in srcs:
            n = st.taken.get(s, 0)
            if (s, n) in seen:
                st.taken[s] = n + 1
                return s, f"{ns}/b/{s}/{me}/{n}", seen.pop((s, n))
        if _has_queues(store, group):
            entry = _pop(store, f"{ns}/q/{me}", deadline)
        else:
            c = st.cursor + 1
            key = f"{ns}/q/{me}/{c}"
            entry = _await(store, key, deadline)
            if entry is not None:
                st.cursor = c
                _spent.append(key)  # deleted after this message's payload (off the critical path)
        if entry is None:
            who = ", ".join(str(s) for s in srcs)
            raise BranchTimeout(f"recv_branch: no branch from rank{'s' if len(srcs) > 1 else ''} {who} within "
                                f"{t:g} s (nothing was posted; the group is usable)", ranks=srcs)
        who, header = entry.split(b"\n", 1)
        s, n = map(int, who.split())
        seen[(s, n)] = header


def decide(base: str, verdict: str) -> bool:
    """Receiver: record ``verdict`` unless the sender withdrew first; True if ours stands. After an "ok" that
    stands the caller receives the payload (post_payload releases the queue entries meanwhile)."""
    store = _store()
    got = store.compare_set(f"{base}/a", "", verdict).decode()
    if got == "withdrawn":
        store.delete_key(f"{base}/a")
    if got == "withdrawn" or verdict != "ok":
        release()
    return got != "withdrawn"


def release(key: str | None = None) -> None:
    """Delete ``key`` once it is no longer read, with the queue entries read since (store hygiene: 100 rounds
    leave the store as it was). Called while the payload moves: the store round trips overlap it."""
    store = _store()
    if key is not None:
        store.delete_key(key)
    while _spent:
        store.delete_key(_spent.pop())


WHOLE_BYTES = 8 << 20
"""gloo payloads of at most this many bytes travel as their pieces, uncut (see :func:`message_bytes`)."""


def message_bytes(device, nbytes: int) -> int:
    """The largest message a payload of ``nbytes`` is cut into on ``device`` (0: its pieces whole): 1 MiB for gloo
    (CPU tensors) beyond :data:`WHOLE_BYTES`, whole pieces below it and for NCCL. gloo moves one large message
    slower than the same bytes as 1 MiB messages posted at once (2 processes, one thread each, medians of 15:
    45 MiB 18.8 vs 12.8 ms, 180 MiB 72.6 vs 45.4 ms, 11 MiB 3.25 vs 3.15 ms), but below ~8 MiB each message's post
    and wait cost more than they save (``bench/bench_transport.py``, SmolLM2 fp32, old and new code alternated): a
    64-token branch (2.9 MB) 2.05-2.69 ms (median of 4 runs 2.44) in three messages, 2.02-2.19 ms (2.09) whole; a
    128-token one (5.9 MB) 3.24-4.21 ms (3.97) in six, 3.28-3.65 ms (3.59) whole. NCCL pays a launch per message
    instead."""
    return 1 << 20 if torch.device(device).type == "cpu" and nbytes > WHOLE_BYTES else 0


def send_payload(pieces, dst: int, group, base: str) -> None:
    """Send the payload as its pieces (1-D uint8 tensors, in payload order), every send posted at once; the
    message's verdict key is released while they move."""
    works = [dist.isend(p, dst, group=group) for p in pieces]
    release(f"{base}/a")
    for w in works:
        w.wait()


class PayloadPool:
    """Received CPU payload buffers, reused once nothing references them any more.

    A fresh buffer costs a page fault per 4 KiB on its first write (measured: 140 ms for 189 MB, as long as the
    transfer itself), because large allocations come straight from ``mmap``. A buffer is free again when every
    branch (or prefix) built on it is gone: its storage's use count is back to what it was when the pool made
    it. At most ``max_free_bytes`` of free buffers are kept (the least recently used beyond are released).
    CUDA payloads use torch's caching allocator instead."""

    def __init__(self, max_free_bytes: int = 1 << 30):
        self.max_free_bytes = max_free_bytes
        self.buffers = []  # [(tensor, use count when alone)], least recently used first

    @staticmethod
    def _uses(buf: torch.Tensor) -> int:
        return torch._C._storage_Use_Count(buf.untyped_storage()._cdata)

    def take(self, nbytes: int, device) -> torch.Tensor:
        if torch.device(device).type != "cpu":
            return torch.empty(nbytes, dtype=torch.uint8, device=device)
        for i, (buf, alone) in enumerate(self.buffers):
            if buf.numel() == nbytes and self._uses(buf) == alone:
                self.buffers.append(self.buffers.pop(i))
                return buf.view(-1)  # an alias: holding it (or views of it) keeps the buffer taken
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self.buffers.append((buf, self._uses(buf)))
        out = buf.view(-1)
        self.trim(self.max_free_bytes)
        return out

    def trim(self, max_free_bytes: int = 0) -> None:
        """Release free buffers (least recently used first) until at most ``max_free_bytes`` stay free."""
        free = [entry for entry in self.buffers if self._uses(entry[0]) == entry[1]]
        total = sum(b.numel() for b, _ in free)
        for entry in free:
            if total <= max_free_bytes:
                break
            # by identity: == between tuples would compare their tensors elementwise
            self.buffers = [e for e in self.buffers if e is not entry]
            total -= entry[0].numel()


payload_pool = PayloadPool()


def post_payload(nbytes: int, ranges, src: int, group, device) -> tuple:
    """Post the receives of a payload of ``nbytes`` sent by :func:`send_payload` as the messages ``ranges``, into
    ONE buffer (from :data:`payload_pool`); returns ``(buffer, works)``: the caller may build views of the buffer
    while the bytes move, then :func:`wait_payload`. The queue entries read are released meanwhile."""
    buf = payload_pool.take(nbytes, device)
    # the messages tile the payload back to back (wire.Header.ranges): one split, not one slice per message
    works = [dist.irecv(m, src, group=group) for m in buf.split([b - a for a, b in ranges])] if ranges else []
    release()
    return buf, works


def wait_payload(works) -> None:
    """Wait for every receive :func:`post_payload` posted (they complete in order)."""
    for w in works:
        w.wait()


# ---- broadcast (a collective: every rank of the group takes part) -------------------------------------------
def bcast_keys(group) -> str:
    st = _state(group)
    st.bcast += 1
    return f"{_ns(group)}/p/{st.bcast - 1}"


def bcast_publish(base: str, header: bytes, ranks, timeout) -> str | None:
    """Source: publish the header, collect every rank's verdict; None if all accepted, else the refusals."""
    store = _store()
    store.set(f"{base}/h", header)
    t = _seconds(timeout)
    deadline = None if t is None else time.monotonic() + t
    refusals, missing = [], []
    for r in ranks:
        v = _await(store, f"{base}/v/{r}", deadline)
        if v is None:
            missing.append(r)
            continue
        v = v.decode()
        store.delete_key(f"{base}/v/{r}")
        if v != "ok":
            refusals.append(f"rank {r}: {v.removeprefix('reject:')}")
    if missing:
        refusals.append(f"ranks {missing} did not answer within {t:g} s")
    decision = "go" if not refusals else "abort:" + "; ".join(refusals)
    store.set(f"{base}/d", decision)
    store.delete_key(f"{base}/h")
    return None if not refusals else decision.removeprefix("abort:")


def bcast_header(base: str, src: int, timeout) -> bytes:
    t = _seconds(timeout)
    header = _await(_store(), f"{base}/h", None if t is None else time.monotonic() + t)
    if header is None:
        raise TimeoutError(f"broadcast_prefix: rank {src} published no prefix within {t:g} s")
    return header


def bcast_answer(base: str, verdict: str, src: int, timeout) -> str:
    """Receiver: post our verdict, wait for the source's decision ("go" or "abort:<why>")."""
    store = _store()
    store.set(f"{base}/v/{_rank()}", verdict)
    t = _seconds(timeout)
    decision = _await(store, f"{base}/d", None if t is None else time.monotonic() + t)
    if decision is None:
        raise TimeoutError(f"broadcast_prefix: rank {src} gave no decision within {t:g} s")
    return decision.decode()


def bcast_done(base: str, n_readers: int) -> None:
    """Each rank that read the decision counts itself; the last one deletes the key."""
    store = _store()
    if store.add(f"{base}/n", 1) == n_readers:
        store.delete_key(f"{base}/d")
        store.delete_key(f"{base}/n")
