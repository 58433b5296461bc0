"""Agent-like workflow data: the base model itself playing the workers of drawn tasks.

:func:`build_workflows` turns tasks drawn from the family catalogue (:mod:`pskernels.synthesis.families`)
into examples of the JSONL format of :mod:`pskernels.synthesis.data`: the model plays the workers (each
continues ``prefix + its sub-task`` greedily for ``worker_tokens`` tokens, all workers of one example in one
batched ``generate`` on a zero-copy ``ParallelCache``, :func:`pskernels.synthesis.workflow.run_workers`), and
the branches are the workers' turns as text. No ``target``: the teacher's greedy continuation over the text
concatenation is computed by the trainer / evaluator (distillation). Each example carries
``kind = "workflow:<family>"`` and ``split = "train" | "held_out"``.

The generated text around the facts of a sub-task is what the model makes of them, as in a real workflow.

Roles: with a tokenizer that has a chat template, the pieces are cut out of the template's own rendering
(system message = system prompt + task; per worker one user turn = its sub-task and one assistant turn = its
generated answer; the synthesis prompt a final user turn and the generation prompt). Without one (e.g. the
:class:`~pskernels.synthesis.data.ByteTokenizer` of the tiny test model): plain ``System:`` / ``User:`` /
``Assistant:`` lines (:data:`PLAIN`).

Deterministic: the tasks are (:func:`pskernels.synthesis.families.draw_workflows`) and generation is greedy.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._core.devices import dtype_name
from .adapter import base_model
from .data import encode, tokenize_example, validate_example
from .distill import eos_ids, patched, teacher_greedy
from .families import FAMILIES, draw_workflows
from .workflow import output_cache, run_workers

REPETITION_PENALTY = 1.3  # as `pskernels demo`: greedy decoding of a 135M model loops without it


# ---- roles ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoleFormat:
    """How the pieces of a workflow are written as text.

    ``prefix = system_open + system + "\\n\\n" + task + system_close``;
    worker turn ``= user_open + subtask + to_assistant``, its branch ``= turn + generated + assistant_close``;
    synthesis prompt ``= user_open + synthesis + to_generation``."""

    system_open: str
    system_close: str
    user_open: str
    to_assistant: str
    assistant_close: str
    to_generation: str
    chat: bool = False

    def prefix(self, system: str, task: str) -> str:
        return self.system_open + system + "\n\n" + task + self.system_close

    def worker_turn(self, subtask: str) -> str:
        return self.user_open + subtask + self.to_assistant

    def prompt(self, synthesis: str) -> str:
        return self.user_open + synthesis + self.to_generation


PLAIN = RoleFormat("System: ", "\n", "User: ", "\nAssistant:", "\n", "\nAssistant:")
_S = ["\x1fPSK_S%d\x1f" % i for i in range(4)]


def role_format(tokenizer, chat: bool | None = None) -> RoleFormat:
    """The tokenizer's chat template cut into :class:`RoleFormat` pieces (``chat=None``: when it has one), else
    :data:`PLAIN`. Raises ``ValueError`` when ``chat=True`` and the template cannot be cut that way."""
    has = callable(getattr(tokenizer, "apply_chat_template", None)) and getattr(tokenizer, "chat_template", None)
    if chat is False or (chat is None and not has):
        return PLAIN
    if not has:
        raise ValueError("chat=True: the tokenizer has no chat template")
    msgs = [{"role": "system", "content": _S[0]}, {"role": "user", "content": _S[1]},
            {"role": "assistant", "content": _S[2]}, {"role": "user", "content": _S[3]}]
    full = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    sys_only = tokenizer.apply_chat_template(msgs[:1], tokenize=False)
    parts = full
    cut = []
    for s in _S:
        if parts.count(s) != 1:
            raise ValueError(f"chat template: cannot locate message {s!r} in its rendering; pass chat=False")
        a, parts = parts.split(s)
        cut.append(a)
    a, b, c, d = cut
    e = parts
    if not (sys_only.startswith(a + _S[0]) and b.startswith(sys_only[len(a + _S[0]):])):
        raise ValueError("chat template: the system turn renders differently alone; pass chat=False")
    sys_close = sys_only[len(a + _S[0]):]
    user_open = b[len(sys_close):]
    if not d.endswith(user_open):
        raise ValueError("chat template: user turns open differently; pass chat=False")
    return RoleFormat(a, sys_close, user_open, c, d[:len(d) - len(user_open)], e, chat=True)


# ---- generation -------------------------------------------------------------------------------------
class OwnTokensRepetitionPenalty:
    """A repetition penalty (as transformers' ``repetition_penalty``) over each row's own tokens only:
    columns before ``starts[row]`` (left padding) are ignored, so that a worker's output does not depend on
    the other workers of its batch. The shared prefix (in the cache) is not penalized."""

    def __init__(self, penalty: float, starts):
        self.penalty, self.starts = float(penalty), list(starts)

    def __call__(self, input_ids, scores):
        for i, s in enumerate(self.starts):
            ids = input_ids[i, s:]
            if ids.numel():
                sc = scores[i].gather(0, ids)
                sc = torch.where(sc < 0, sc * self.penalty, sc / self.penalty)
                scores[i] = scores[i].scatter(0, ids, sc)
        return scores


def _stop_ids(model, tokenizer, fmt: RoleFormat) -> list:
    ids = []
    for x in (getattr(tokenizer, "eos_token_id", None), getattr(getattr(model, "generation_config", None),
                                                                  "eos_token_id", None)):
        ids += [x] if isinstance(x, int) else list(x or [])
    if fmt.chat and fmt.assistant_close.strip():
        close = encode(tokenizer, fmt.assistant_close.strip())
        if len(close) == 1:
            ids.append(close[0])
    return list(dict.fromkeys(ids))


@torch.no_grad()
def generate_workers(model, tokenizer, prefix: str, turns: list, *, worker_tokens: int, stop_ids=None,
                     repetition_penalty: float | None = REPETITION_PENALTY) -> list:
    """The workers' greedy answers (token id lists, stop token dropped) after ``prefix + turns[i]``, all in one
    batched :func:`~pskernels.synthesis.workflow.run_workers` on a zero-copy ``ParallelCache``; the base
    model plays the workers (a PeftModel's adapter is disabled)."""
    from transformers import LogitsProcessorList

    dev = next(model.parameters()).device
    stop = list(stop_ids or [])
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (stop[0] if stop else 0)
    prefix_ids = torch.tensor([encode(tokenizer, prefix)], dtype=torch.long, device=dev)
    worker_ids = [torch.tensor(encode(tokenizer, t), dtype=torch.long, device=dev) for t in turns]
    if prefix_ids.numel() == 0 or any(w.numel() == 0 for w in worker_ids):
        raise ValueError("prefix and every worker turn must tokenize to at least one token")
    kw = {}
    if repetition_penalty is not None and repetition_penalty != 1.0:
        L = max(len(w) for w in worker_ids)
        kw["logits_processor"] = LogitsProcessorList([OwnTokensRepetitionPenalty(
            repetition_penalty, [L - len(w) for w in worker_ids])])
    with patched(model), base_model(model):
        w = run_workers(model, prefix_ids, worker_ids, max_new_tokens=worker_tokens,
                        eos_token_id=stop or None, pad_token_id=pad, **kw)
    out = []
    for a in w.answer_ids:
        a = a.tolist()
        if a and a[-1] in stop:
            a = a[:-1]
        out.append(a)
    return out


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def build_workflows(model, tokenizer, families=None, n_per_family: int = 1, *, seed: int = 0,
                    worker_tokens: int = 48, n_workers=(2, 8), repetition_penalty: float | None = REPETITION_PENALTY,
                    chat: bool | None = None, teacher_tokens: int = 0,
                    progress: Callable | None = None, shard: tuple | None = None) -> list[dict]:
    """Workflow examples in the :mod:`pskernels.synthesis.data` format, the model playing the workers.

    Parameters
    ----------
    model, tokenizer
        The base model (or a PeftModel: its adapter is disabled for the workers) and its tokenizer.
    families
        Which families (:func:`pskernels.synthesis.families.select_families`): None = all, ``"train"``,
        ``"held_out"``, names.
    n_per_family : int
        Examples per family (round-robin order over the families,
        :func:`pskernels.synthesis.families.draw_workflows`).
    seed : int
        Draws every task (and so the whole output, generation being greedy).
    worker_tokens : int
        Tokens each worker generates at most (it stops earlier at the end of its turn).
    n_workers : (int, int)
        Inclusive range of workers per example, intersected with each family's range (2-8 by default).
    repetition_penalty : float or None
        Penalty on each worker's own tokens (:class:`OwnTokensRepetitionPenalty`); None or 1.0: plain greedy.
    chat : bool or None
        Roles from the tokenizer's chat template (None: when it has one) or plain lines (:data:`PLAIN`).
    teacher_tokens : int
        When > 0, also store the teacher's greedy continuation (this many tokens at most, the text
        concatenation read by the base model, with the model's dtype) as the example's ``teacher`` field:
        training and evaluation in that dtype then take it instead of decoding it again, and check it against
        the teacher's logits.
    progress : callable or None
        Called as ``progress(i, n, example)`` after each example.
    shard : (int, int) or None
        ``(k, n)``: build only the examples ``k, k + n, k + 2n, ...`` of the drawn list (one of ``n`` processes
        sharing the work). Each example depends on its draw alone, so interleaving the ``n`` shards' outputs
        gives exactly the unsharded list.

    Returns
    -------
    list of dict
        ``{"id", "kind": "workflow:<family>", "split": "train" | "held_out", "prefix", "branches", "prompt",
        "answer"?, "teacher"?, "meta"}`` without ``target``.
    """
    if worker_tokens < 1:
        raise ValueError(f"worker_tokens: expected >= 1, got {worker_tokens}")
    if teacher_tokens < 0:
        raise ValueError(f"teacher_tokens: expected >= 0 (0: not stored), got {teacher_tokens}")
    fmt = role_format(tokenizer, chat)
    stop = _stop_ids(model, tokenizer, fmt)
    specs = draw_workflows(families, n_per_family, seed=seed, n_workers=n_workers)
    if shard is not None:
        k, n = shard
        if not 0 <= k < n:
            raise ValueError(f"shard: expected (k, n) with 0 <= k < n, got {shard}")
        specs = specs[k::n]
    was_training = model.training
    model.eval()
    out = []
    try:
        for i, sp in enumerate(specs):
            prefix = fmt.prefix(sp.system, sp.task.task)
            turns = [fmt.worker_turn(s) for s in sp.task.subtasks]
            answers = generate_workers(model, tokenizer, prefix, turns, worker_tokens=worker_tokens, stop_ids=stop,
                                       repetition_penalty=repetition_penalty)
            ex = {"id": sp.id, "kind": f"workflow:{sp.family}", "split": sp.split, "prefix": prefix,
                  "branches": [t + _decode(tokenizer, a) + fmt.assistant_close for t, a in zip(turns, answers)],
                  "prompt": fmt.prompt(sp.task.synthesis),
                  "meta": {"family": sp.family, "system": sp.system, "task": sp.task.task,
                           "subtasks": list(sp.task.subtasks), "synthesis": sp.task.synthesis,
                           "worker_answer_tokens": [len(a) for a in answers], "worker_tokens": worker_tokens,
                           "repetition_penalty": repetition_penalty, "seed": seed, **sp.task.meta}}
            if sp.task.answer is not None:
                ex["answer"] = sp.task.answer
            if teacher_tokens:
                ex["teacher"] = {"ids": _teacher_ids(model, tokenizer, ex, teacher_tokens), "tokens": teacher_tokens,
                                 "dtype": dtype_name(next(model.parameters()).dtype)}
            out.append(validate_example(ex, sp.id))
            if progress is not None:
                progress(i, len(specs), ex)
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def _teacher_ids(model, tokenizer, ex: dict, n: int) -> list:
    """The teacher's greedy continuation of ``ex`` (as training computes it: base model, patched)."""
    tex = tokenize_example(tokenizer, ex, device=next(model.parameters()).device)
    with patched(model), base_model(model):
        prefix = output_cache(model(tex.prefix_ids[None], use_cache=True))
        return teacher_greedy(model, tex, prefix, n, eos_ids(tokenizer)).tolist()


def split_of(example: dict) -> str | None:
    """``"train"`` / ``"held_out"`` of an example: its ``split`` field, else from a ``workflow:<family>`` kind."""
    if example.get("split"):
        return example["split"]
    kind = example.get("kind") or ""
    fam = FAMILIES.get(kind.removeprefix("distill:").removeprefix("workflow:"))
    return fam.split if fam is not None and "workflow:" in kind else None


def worker_turn_tokens(tokenizer, example: dict) -> list[int]:
    """Per branch of a workflow ``example`` (:func:`build_workflows`): the tokens of the worker's own turn (its
    instruction, up to where its answer starts) at the start of the branch, e.g. what
    :func:`pskernels.synthesis.recompute.recompute_branches` recomputes as each branch's ``head``.

    Raises ``ValueError`` naming the example when it has no worker instructions (``meta.subtasks``) or its
    branches do not start with the turns this tokenizer's role format writes (another model built it)."""
    subtasks = (example.get("meta") or {}).get("subtasks")
    name = example.get("id", "")
    if not subtasks or len(subtasks) != len(example["branches"]):
        raise ValueError(f"example {name!r}: no worker instruction per branch (meta.subtasks); it is not a workflow "
                         "built by build_workflows")
    fmt = role_format(tokenizer)
    out = []
    for i, (subtask, branch) in enumerate(zip(subtasks, example["branches"])):
        turn = encode(tokenizer, fmt.worker_turn(subtask))
        if encode(tokenizer, branch)[:len(turn)] != turn:
            raise ValueError(f"example {name!r}: branch {i} does not start with its worker's turn as this tokenizer "
                             "writes it")
        out.append(len(turn))
    return out


def recompute_counts(tokenizer, example, recompute: tuple) -> tuple:
    """``(head, tail, together)`` of one example for a synthesizer trained with ``TrainConfig.recompute``: head
    ``"prompt"`` becomes its workers' turn lengths (0 per branch when it has no worker turns, e.g. natural text)."""
    head, tail, together = recompute
    if head == "prompt":
        meta = example.get("meta") if isinstance(example, dict) else None
        head = worker_turn_tokens(tokenizer, example) if (meta or {}).get("subtasks") else 0
    return head, tail, together
