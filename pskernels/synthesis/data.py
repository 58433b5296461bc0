"""Training data for the synthesizer (mapper + adapter): format, builders, tokenization.

JSONL format (one example per line)::

    {"prefix":   str,        # shared prefix: system prompt + task (every worker continues from it)
     "branches": [str, ...], # the workers' branches (each continues the prefix independently)
     "prompt":   str,        # the synthesis prompt (read after all branches; at least one token)
     "target":   str,        # optional: the text to score (teacher-forced); absent -> the teacher's greedy
                             #   continuation is computed online (distillation)
     "answer":   str,        # optional: ground truth; accuracy = answer contained in the greedy output
     "kind":     str,        # optional: "exposure" | "sum" | "compare" | "which" | "distill:..." |
                             #   "workflow:<family>" (pskernels.synthesis.workflows) | ...
     "split":    str,        # optional: "train" | "held_out" (the family's split; workflow examples)
     "teacher":  {"ids": [int, ...], "tokens": int, "dtype": str},
                             # optional, without "target": the teacher's greedy continuation, stored when the
                             #   file was built (``build_workflows(teacher_tokens=...)``): ``tokens`` asked for,
                             #   ``ids`` what came (fewer when it ended with end-of-sequence), ``dtype`` the
                             #   model's when it was decoded (absent: "float32"); used in place of the online
                             #   continuation by a model of that dtype and checked against its own logits
     "id":       str}        # optional

Text pieces are tokenized separately and concatenated as *ids*, so the teacher (text concatenation:
``prefix + branches + prompt + target``) and the student (``ParallelCache(prefix, branches)`` reading
``prompt + target``) see exactly the same tokens. Start branches / prompt / target with a space or a
newline where the words must not run together.

Builders (deterministic for a given ``seed``):

* :func:`exposure_examples` (a) parallel exposure: a text is cut into prefix | N branches | prompt |
  target; the target is its true continuation.
* :func:`natural_exposure_examples` (a) the same on longer passages of natural text that ships with
  Python (:mod:`pskernels.synthesis.corpus`).
* :func:`aggregation_examples` (b) aggregation: synthetic tasks whose answer needs facts from several
  branches: sums of numbers stated in different branches, comparisons, "which worker said X".
* :func:`distillation_examples` (c) the same examples without ``target``: the teacher's greedy
  continuation is computed online by the trainer/evaluator.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

import torch

KEYS = ("prefix", "branches", "prompt", "target", "answer", "kind", "split", "teacher", "id")
SPLITS = ("train", "held_out")


def validate_example(ex: dict, where: str = "example") -> dict:
    """Check one example against the format; returns it (raises ``ValueError`` naming the field)."""
    if not isinstance(ex, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(ex).__name__}")
    for k in ("prefix", "prompt"):
        if not isinstance(ex.get(k), str):
            raise ValueError(f"{where}: field {k!r} must be a string, got {type(ex.get(k)).__name__}")
    if not ex["prompt"]:
        raise ValueError(f"{where}: field 'prompt' must not be empty (the synthesizer needs at least one token)")
    br = ex.get("branches")
    if not isinstance(br, list) or not br or not all(isinstance(b, str) and b for b in br):
        raise ValueError(f"{where}: field 'branches' must be a non-empty list of non-empty strings")
    for k in ("target", "answer", "kind", "split", "id"):
        if k in ex and ex[k] is not None and not isinstance(ex[k], str):
            raise ValueError(f"{where}: field {k!r} must be a string, got {type(ex[k]).__name__}")
    if ex.get("split") is not None and ex["split"] not in SPLITS:
        raise ValueError(f"{where}: field 'split' must be one of {SPLITS}, got {ex['split']!r}")
    if ex.get("teacher") is not None:
        _validate_teacher(ex["teacher"], where)
    unknown = set(ex) - set(KEYS) - {"meta"}
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)} (expected {KEYS} or 'meta')")
    return ex


def _validate_teacher(t, where: str) -> None:
    ok = (isinstance(t, dict) and {"ids", "tokens"} <= set(t) <= {"ids", "tokens", "dtype"}
          and isinstance(t["tokens"], int) and not isinstance(t["tokens"], bool) and isinstance(t["ids"], list)
          and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in t["ids"])
          and isinstance(t.get("dtype", ""), str))
    if not ok:
        raise ValueError(f"{where}: field 'teacher' must be {{'ids': [non-negative int, ...], 'tokens': int, "
                         f"'dtype'?: str}}, got {t!r}")
    if not 1 <= len(t["ids"]) <= t["tokens"]:
        raise ValueError(f"{where}: field 'teacher' must hold 1 to tokens = {t['tokens']} ids, got {len(t['ids'])}")


def save_jsonl(examples, path: str | os.PathLike) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, ex in enumerate(examples):
            validate_example(ex, f"examples[{i}]")
            f.write(json.dumps(ex, ensure_ascii=False, sort_keys=True) + "\n")


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    ex = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
                out.append(validate_example(ex, f"{path}:{n}"))
    return out


# ---- (a) parallel exposure ---------------------------------------------------------------------------
DEFAULT_TEXTS = [
    "The old harbour town wakes up early. Fishermen sort their nets on the quay while the bakery opens its "
    "shutters and the smell of fresh bread drifts over the water. By eight o'clock the market square is full of "
    "stalls selling vegetables, cheese and flowers, and children run between them on their way to school. In the "
    "afternoon the wind turns and the boats come back, followed by a cloud of gulls that circle above the harbour.",
    "Photosynthesis is the process by which plants turn light into chemical energy. Inside the leaves, chlorophyll "
    "absorbs sunlight and uses its energy to split water molecules. The oxygen is released into the air, while the "
    "hydrogen is combined with carbon dioxide to build sugars. These sugars feed the plant and, through the food "
    "chain, almost every other living thing on Earth. Without this process the atmosphere would contain little oxygen.",
    "To bake a simple loaf of bread, mix flour, water, salt and a little yeast in a large bowl. Knead the dough for "
    "ten minutes until it is smooth and elastic, then cover it and let it rise in a warm place for an hour. Shape "
    "the dough into a loaf, let it rise again, and bake it in a hot oven for about forty minutes. The bread is "
    "ready when it sounds hollow if you tap the bottom, and it should cool before you slice it.",
    "The team met on Monday to plan the release. Anna reported that the new search feature was finished and "
    "tested, but the documentation still needed work. Ben said that two bugs in the payment module were fixed and "
    "a third one was being investigated. Clara suggested moving the release to Thursday so that everything could "
    "be checked once more, and the team agreed. They will meet again on Wednesday to confirm the decision.",
    "Mountains are formed when the plates of the Earth's crust push against each other. Over millions of years "
    "the rock is folded and lifted high above the surrounding land. Rivers and glaciers then carve deep valleys "
    "into the slopes, and wind and rain slowly wear the peaks down. The highest mountains on Earth are still "
    "growing by a few millimetres every year, because the plates beneath them have not stopped moving.",
    "A good night's sleep helps the body and the brain recover. During deep sleep the muscles repair themselves "
    "and the immune system becomes stronger, while during dream sleep the brain sorts the memories of the day. "
    "Adults usually need between seven and nine hours of sleep, and children need even more. Going to bed at the "
    "same time every evening and avoiding screens before sleep are simple ways to sleep better.",
]


def _words(text):
    return text.split()


def exposure_examples(texts=None, n: int | None = None, *, n_branches=(2, 4), prefix_words=(8, 16),
                      branch_words=(8, 16), prompt_words=(2, 4), target_words=(6, 10), seed: int = 0) -> list[dict]:
    """(a) Parallel exposure: cut a text into ``prefix | branch_1..N | prompt | target`` (contiguous words).

    The teacher reads the original text; the student reads the N pieces as parallel branch caches and must
    continue it. ``n`` examples (default: one per text), drawn with ``random.Random(seed)``; ranges are
    inclusive ``(lo, hi)``; a text too short for the drawn sizes is shrunk to fit."""
    texts = list(DEFAULT_TEXTS if texts is None else texts)
    if not texts:
        raise ValueError("texts: expected at least one text")
    rng = random.Random(seed)
    n = len(texts) if n is None else n
    out = []
    for i in range(n):
        text = texts[i % len(texts)]
        w = _words(text)
        nb = rng.randint(*n_branches)
        sizes = [rng.randint(*prefix_words)] + [rng.randint(*branch_words) for _ in range(nb)]
        sizes += [rng.randint(*prompt_words), rng.randint(*target_words)]
        while sum(sizes) > len(w) and max(sizes) > 1:
            j = max(range(len(sizes)), key=lambda k: sizes[k])
            sizes[j] -= 1
        if sum(sizes) > len(w):
            raise ValueError(f"texts[{i % len(texts)}]: too short ({len(w)} words) for {nb} branches")
        start = rng.randint(0, len(w) - sum(sizes))
        pieces, pos = [], start
        for s in sizes:
            pieces.append(w[pos:pos + s])
            pos += s
        join = lambda ws, lead=" ": lead + " ".join(ws)  # noqa: E731
        out.append({"id": f"exposure-{seed}-{i}", "kind": "exposure", "prefix": " ".join(pieces[0]),
                    "branches": [join(p) for p in pieces[1:1 + nb]], "prompt": join(pieces[-2]),
                    "target": join(pieces[-1])})
    return out


# ---- (b) aggregation -------------------------------------------------------------------------------
_ITEMS = [("apples", "basket", "baskets"), ("books", "shelf", "shelves"), ("coins", "box", "boxes"),
          ("chairs", "room", "rooms"), ("eggs", "nest", "nests"), ("pencils", "drawer", "drawers"),
          ("cars", "garage", "garages"), ("cups", "cupboard", "cupboards")]
_CITIES = ["Oslo", "Rome", "Madrid", "Paris", "Berlin", "Vienna", "Lisbon", "Dublin", "Athens", "Prague",
           "Warsaw", "London"]
_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"]
_ANIMALS = ["cat", "dog", "horse", "rabbit", "parrot", "turtle", "goat", "fox", "owl", "mouse"]
AGG_KINDS = ("sum", "compare", "which")


def _agg_sum(rng, nb):
    item, cont, conts = rng.choice(_ITEMS)
    counts = [rng.randint(1, 9) for _ in range(nb)]
    total = sum(counts)
    prefix = (f"Task: {nb} workers each counted the {item} in one {cont}. "
              f"Each worker reports the number of {item} in its {cont}.\n")
    branches = [f"Worker {i + 1}: The {cont} number {i + 1} contains {c} {item}.\n" for i, c in enumerate(counts)]
    prompt = f"Question: How many {item} are there in all the {conts} together?\nAnswer:"
    target = f" There are {total} {item} in total."
    return prefix, branches, prompt, target, str(total), {"counts": counts}


def _agg_compare(rng, nb):
    cities = rng.sample(_CITIES, nb)
    temps = rng.sample(range(5, 36), nb)
    hot = rng.random() < 0.5
    best = max(range(nb), key=lambda i: temps[i]) if hot else min(range(nb), key=lambda i: temps[i])
    word = "warmest" if hot else "coldest"
    prefix = f"Task: {nb} workers each checked today's temperature in one city.\n"
    branches = [f"Worker {i + 1}: In {c} it is {t} degrees today.\n" for i, (c, t) in enumerate(zip(cities, temps))]
    prompt = f"Question: Which city is the {word} today?\nAnswer:"
    target = f" {cities[best]} is the {word}, with {temps[best]} degrees."
    return prefix, branches, prompt, target, cities[best], {"cities": cities, "temps": temps}


def _agg_which(rng, nb):
    colours = rng.sample(_COLOURS, nb)
    animals = rng.sample(_ANIMALS, nb)
    k = rng.randrange(nb)
    ask_colour = rng.random() < 0.5
    prefix = f"Task: {nb} workers each describe themselves in one sentence.\n"
    branches = [f"Worker {i + 1}: My favourite colour is {c} and I have a {a}.\n"
                for i, (c, a) in enumerate(zip(colours, animals))]
    fact = f"favourite colour is {colours[k]}" if ask_colour else f"pet is a {animals[k]}"
    prompt = f"Question: Which worker's {fact}?\nAnswer:"
    target = f" Worker {k + 1} said that."
    return prefix, branches, prompt, target, f"Worker {k + 1}", {"worker": k + 1}


_AGG = {"sum": _agg_sum, "compare": _agg_compare, "which": _agg_which}


def aggregation_examples(n: int, *, kinds=AGG_KINDS, n_branches=(2, 4), seed: int = 0) -> list[dict]:
    """(b) Aggregation: ``n`` synthetic tasks (cycling through ``kinds``) whose answer needs facts stated in
    several branches. Each has a ground-truth ``answer`` (contained in ``target``)."""
    for k in kinds:
        if k not in _AGG:
            raise ValueError(f"kinds: unknown kind {k!r}, expected some of {AGG_KINDS}")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        nb = rng.randint(*n_branches)
        prefix, branches, prompt, target, answer, meta = _AGG[kind](rng, nb)
        out.append({"id": f"{kind}-{seed}-{i}", "kind": kind, "prefix": prefix, "branches": branches,
                    "prompt": prompt, "target": target, "answer": answer, "meta": meta})
    return out


# ---- (c) distillation --------------------------------------------------------------------------------
def distillation_examples(examples) -> list[dict]:
    """(c) Copies of ``examples`` without ``target``: the trainer / evaluator computes the teacher's greedy
    continuation (text concatenation, base model) online and distils on it."""
    out = []
    for ex in examples:
        ex = {k: v for k, v in ex.items() if k != "target"}
        ex["kind"] = "distill:" + ex.get("kind", "")
        out.append(ex)
    return out


def natural_exposure_examples(n: int, *, seed: int = 0) -> list[dict]:
    """(a) Parallel exposure on natural text: :func:`exposure_examples` over the prose passages of
    :func:`pskernels.synthesis.corpus.natural_texts` (shuffled by ``seed``), cut into longer pieces than the
    built-in paragraphs allow: 2-6 branches of 16-40 words after a 16-40 word prefix, a 4-8 word prompt and
    an 8-12 word target. ``kind`` is ``"exposure:natural"``."""
    from .corpus import natural_texts

    texts = natural_texts()
    random.Random(seed).shuffle(texts)
    out = exposure_examples(texts, n, n_branches=(2, 6), prefix_words=(16, 40), branch_words=(16, 40),
                            prompt_words=(4, 8), target_words=(8, 12), seed=seed)
    for ex in out:
        ex["kind"], ex["id"] = "exposure:natural", ex["id"].replace("exposure-", "natural-", 1)
    return out


BUILDERS = {"aggregation": lambda n, seed: aggregation_examples(n, seed=seed),
            "exposure": lambda n, seed: exposure_examples(n=n, seed=seed),
            "natural": lambda n, seed: natural_exposure_examples(n, seed=seed),
            "distill": lambda n, seed: distillation_examples(aggregation_examples(n, seed=seed)),
            "mixed": lambda n, seed: _mixed(n, seed)}


def _mixed(n, seed):
    na = (3 * n + 3) // 4
    ex = aggregation_examples(na, seed=seed) + exposure_examples(n=n - na, seed=seed)
    random.Random(seed).shuffle(ex)
    return ex


def build(name: str, n: int, seed: int = 0) -> list[dict]:
    """``name`` in ``BUILDERS`` (aggregation, exposure, natural, distill, mixed)."""
    if name not in BUILDERS:
        raise ValueError(f"builder: expected one of {sorted(BUILDERS)}, got {name!r}")
    return BUILDERS[name](n, seed)


# ---- tokenization ----------------------------------------------------------------------------------
@dataclass
class TokenizedExample:
    prefix_ids: torch.Tensor  # [P] int64
    branch_ids: list  # N x [L_i]
    prompt_ids: torch.Tensor  # [Q]
    target_ids: torch.Tensor | None  # [T] or None (computed online by the teacher)
    answer: str | None = None
    kind: str = ""
    example: dict = field(default_factory=dict, repr=False)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (HF tokenizers or any object with ``encode``)."""
    if hasattr(tokenizer, "encode"):
        try:
            return list(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return list(tokenizer.encode(text))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_example(tokenizer, ex: dict, device=None) -> TokenizedExample:
    """Tokenize each piece separately: ``prefix_ids, branch_ids (list), prompt_ids, target_ids``."""
    validate_example(ex)
    t = lambda s: torch.tensor(encode(tokenizer, s), dtype=torch.long, device=device)  # noqa: E731
    pre, prompt = t(ex["prefix"]), t(ex["prompt"])
    branches = [t(b) for b in ex["branches"]]
    if pre.numel() == 0 or prompt.numel() == 0 or any(b.numel() == 0 for b in branches):
        raise ValueError(f"example {ex.get('id', '')!r}: prefix, prompt and every branch must tokenize to >= 1 token")
    tgt = t(ex["target"]) if ex.get("target") else None
    return TokenizedExample(pre, branches, prompt, tgt, ex.get("answer"), ex.get("kind", ""), ex)


class ByteTokenizer:
    """A tiny byte-level tokenizer (ids = byte + 3; 0 pad, 1 bos, 2 eos) for random test models."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 259

    def encode(self, text, add_special_tokens=False):
        ids = [b + 3 for b in text.encode("utf-8")]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens=True):
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")
