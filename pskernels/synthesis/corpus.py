"""Natural text that ships with every Python: prose passages for parallel-exposure training.

The exposure builder (:func:`pskernels.synthesis.data.exposure_examples`) cuts a text into
``prefix | N branches | prompt | target``; its six built-in paragraphs are too few and too short to teach a
general repair of parallel caches. :func:`natural_texts` draws longer passages from the Python Language
Reference that CPython installs as ``pydoc_data.topics`` (about 70k words of edited English prose), so
training needs no download and is reproducible on any machine with the same Python minor version.
"""
from __future__ import annotations

import re

_MARKUP = re.compile(r"^\s|^[*=\-~^]{3,}\s*$|^\* |^>>>|::=")


def _prose_paragraphs(text: str, min_words: int):
    """Paragraphs of ``text`` that are prose: no indented (code / grammar) line, no heading underline, no
    bullet, not introducing a code block (a trailing colon), at least ``min_words`` words; newlines inside
    a paragraph become spaces."""
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.split("\n") if ln.strip()]
        if not lines or any(_MARKUP.search(ln) for ln in lines):
            continue
        para = " ".join(ln.strip() for ln in lines)
        if len(para.split()) >= min_words and para[0].isalpha() and not para.endswith(":"):
            yield para


def natural_texts(min_words: int = 120, max_words: int = 320) -> list[str]:
    """Prose passages from ``pydoc_data.topics`` (sorted by topic, so the list is deterministic).

    Consecutive prose paragraphs of one topic are joined until a passage holds at least ``min_words``
    words; a passage stops growing before it would exceed ``max_words``. Passages shorter than
    ``min_words`` (a topic's remainder) are dropped.

    Returns
    -------
    list of str, each ``min_words``..``max_words`` words (a single paragraph longer than ``max_words`` is
    kept whole).
    """
    if min_words < 1 or max_words < min_words:
        raise ValueError(f"min_words, max_words: expected 1 <= min_words <= max_words, got {min_words}, {max_words}")
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        passage, words = [], 0
        for para in _prose_paragraphs(topics[name], 12):
            n = len(para.split())
            if passage and words + n > max_words:
                if words >= min_words:
                    out.append(" ".join(passage))
                passage, words = [], 0
            passage.append(para)
            words += n
            if words >= min_words:
                out.append(" ".join(passage))
                passage, words = [], 0
    return out
