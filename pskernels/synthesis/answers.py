"""Ground-truth answers in generated text: how evaluation counts an answer right, and which target tokens state it
(what answer-weighted distillation weighs, :class:`pskernels.synthesis.train.TrainConfig` ``answer_weight``)."""
from __future__ import annotations

import re

import torch


def answer_span(answer: str, text: str) -> tuple[int, int] | None:
    """Character span ``(start, end)`` of the first place ``text`` states ``answer`` (:func:`answer_found`'s rules),
    or None.

    >>> answer_span("2", "sold out in 12 shops, 2 left"), answer_span("Ines", "no one")
    ((22, 23), None)
    """
    answer = answer.strip()
    if not answer:
        return None
    left = (r"(?<![^\W_])" if answer[0].isalnum() else "") + (r"(?<![0-9][.,:])" if answer[0].isdigit() else "")
    right = r"(?![0-9]|[.,:][0-9])" if answer[-1].isdigit() else ""
    m = re.search(left + re.escape(answer) + right, text, re.IGNORECASE)
    return m.span() if m else None


def answer_found(answer: str, text: str) -> bool:
    """Whether ``text`` states ``answer``: case-insensitive, not inside a longer word or number. A number is matched
    whole (``"2"`` is not in ``"12 shops"``, ``"2.5"`` nor ``"1.2"``); a word may take an ending (``"reject"`` in
    ``"rejected"``), not a beginning (``"accept"`` is not in ``"unacceptable"``).

    >>> answer_found("2", "sold out in 12 shops"), answer_found("2", "in 2 shops."), answer_found("20:30", "at 20:30.")
    (False, True, True)
    >>> answer_found("reject", "They rejected it"), answer_found("Ines", "INES won"), answer_found("Alice", "Malice")
    (True, True, False)
    """
    return answer_span(answer, text) is not None


def answer_token_weights(tokenizer, answer: str | None, target_ids: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-token weights ``[T]`` (float32, on ``target_ids``' device) of a target continuation: ``weight`` on the
    tokens that state ``answer`` where the decoded continuation states it (the first place, as :func:`answer_found`
    finds it in the whole continuation), 1 elsewhere; all ones without an answer or where it is not stated.

    A token states the answer when its characters overlap the answer's span: a token's span is where the decoded
    text of the tokens before it ends and that of the tokens up to it ends (``skip_special_tokens``, as evaluation
    decodes).

    >>> from pskernels.synthesis.data import ByteTokenizer
    >>> tok = ByteTokenizer()
    >>> answer_token_weights(tok, "12", torch.tensor(tok.encode("It is 12.")), 4.0).tolist()
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 4.0, 4.0, 1.0]
    """
    ids = target_ids.tolist()
    out = torch.ones(len(ids), dtype=torch.float32, device=target_ids.device)
    if not answer or weight == 1.0:
        return out
    text = tokenizer.decode(ids, skip_special_tokens=True)
    span = answer_span(answer, text)
    if span is None:
        return out
    start, end = span
    before = 0  # decoded length of the tokens before token t
    for t in range(len(ids)):
        upto = len(tokenizer.decode(ids[:t + 1], skip_special_tokens=True))
        if upto > start and before < end:
            out[t] = weight
        if upto >= end:
            break
        before = upto
    return out
