"""The tables ``pskernels eval`` prints: one row per setting, one block per family, and two results paired per
example. Standard errors (in brackets) take the examples as the sampled units."""
from __future__ import annotations

from ..synthesis import evaluate as evaluation

# the recompute setting's label, by what is recomputed at each end of a branch
RECOMPUTE_NAME = "(v) recomputed head {}, tail {}"
SETTING_NAMES = {"text_concat": "(i) text concatenation (teacher)", "parallel": "(ii) parallel, untrained",
                 "ape": "(iii) APE calibration (T=S=0.9)", "trained": "(iv) trained mapper + adapter",
                 "recompute": RECOMPUTE_NAME.format(*evaluation.RECOMPUTE)}


def _share(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _sampled(metrics) -> bool:
    """Whether any of ``metrics`` (per setting) has a sampled answer accuracy: its columns are shown."""
    return any(m.get("sampled_accuracy") is not None for m in metrics)


SAMPLED_HEAD = f"{'sampled':>9}{'vs text, pts (se)':>19}"


def _sampled_cells(m) -> str:
    """The sampled answer accuracy and, in points, its paired difference to text concatenation's (standard
    error in brackets)."""
    d = m.get("sampled_vs_text")
    diff = "-" if d is None else f"{100 * d[0]:+.2f}" + ("" if d[1] is None else f" ({100 * d[1]:.2f})")
    return f"{_share(m.get('sampled_accuracy')):>9}{diff:>19}"


def _with_error(value: str, error, fmt: str) -> str:
    return value if error is None else f"{value} ({error:{fmt}})"


def _ratio_cell(m) -> str:
    """The KL as a ratio to the untrained setting's, its standard error in brackets."""
    d = m.get("kl_vs_untrained")
    return "-" if d is None else _with_error(f"{d[0]:.2f}x", d[1], ".2f")


def _top1_cell(m) -> str:
    return _with_error(f"{m['top1']:.3f}", m.get("top1_se"), ".3f")


FIDELITY_HEAD = f"{'KL nats/tok':>12}{'vs untrained (se)':>19}{'top-1 (se)':>16}"


def _fidelity_cells(m) -> str:
    return f"{m['kl']:>12.4f}{_ratio_cell(m):>19}{_top1_cell(m):>16}"


def _discordance(d) -> str:
    return "-" if d is None else f"{d[0]} / {d[1]} ({d[2]:.3f})"


def format_table(r: dict, names: dict | None = None) -> str:
    """The result of :func:`pskernels.synthesis.evaluate.evaluate` as a table, one row per setting
    (``names``: row labels replacing :data:`SETTING_NAMES` entries); where examples have an answer, ``only it /
    only text (p)``: the examples only the setting's greedy answer states it in, those only text concatenation's
    does, and the exact McNemar p-value of that split; where answers were sampled, a ``sampled``
    column (answer accuracy over sampled continuations) and ``vs text``: per example, the setting's share minus text
    concatenation's, averaged, in points (its standard error in brackets). ``vs untrained``: the KL as a ratio to
    the untrained setting's over the same examples; standard errors take the examples as the sampled units."""
    names = {**SETTING_NAMES, **(names or {})}
    rows = [s for s in evaluation.SETTINGS if s in r]
    sampled = _sampled(r[s] for s in rows)
    paired = any(r[s].get("answers_vs_text") for s in rows)
    w = max([36] + [len(names[s]) + 2 for s in rows])  # a long label (a recompute synthesizer's) widens the column
    lines = [f"{'setting':<{w}}{FIDELITY_HEAD}{'exact':>8}{'accuracy':>10}"
             + (f"{'only it / only text (p)':>25}" if paired else "") + (SAMPLED_HEAD if sampled else "")]
    for s in rows:
        m = r[s]
        lines.append(f"{names[s]:<{w}}{_fidelity_cells(m)}{m['exact']:>8.3f}{_share(m['accuracy']):>10}"
                     + (f"{_discordance(m.get('answers_vs_text')):>25}" if paired else "")
                     + (_sampled_cells(m) if sampled else ""))
    any_s = next(v for k, v in r.items() if k != "examples")
    lines.append(f"({any_s['n']} held-out examples, {any_s['tokens']} target tokens)")
    return "\n".join(lines)


def _family_name(kind: str) -> str:
    return kind.removeprefix("workflow:") if kind else "(no kind)"


def format_family_table(bf: dict, settings=None) -> str:
    """:func:`pskernels.synthesis.evaluate.by_family` as a table: one block per family (training families,
    then held-out families, then other kinds), then the training-family, held-out-family and overall rows."""
    from ..synthesis.workflows import split_of

    settings = [s for s in (settings or evaluation.SETTINGS) if s in bf["all"]]
    sampled = _sampled(bf["all"][s] for s in settings)
    fams = bf["families"]
    width = max([22] + [len(_family_name(k)) + 2 for k in fams])  # a kind such as distill:workflow:<family>
    head = (f"{'family':<{width}}{'split':<10}{'n':>4}  {'setting':<13}{FIDELITY_HEAD}{'exact':>8}{'accuracy':>10}"
            + (SAMPLED_HEAD if sampled else ""))
    lines = [head, "-" * len(head)]

    def block(label, split, m):
        for i, s in enumerate(settings):
            x = m[s]
            left = f"{label:<{width}}{split:<10}{x['n']:>4}" if i == 0 else " " * (width + 14)
            extra = _sampled_cells(x) if sampled else ""
            lines.append(f"{left}  {s:<13}{_fidelity_cells(x)}{x['exact']:>8.3f}{_share(x['accuracy']):>10}{extra}")

    def split_of_kind(kind):  # as the split rows below group the examples
        return split_of({"kind": kind}) or "-"

    order = sorted(fams, key=lambda k: {"train": 0, "held_out": 1}.get(split_of_kind(k), 2))
    for k in order:
        block(_family_name(k), split_of_kind(k), fams[k])
    lines.append("-" * len(head))
    labels = {"train": "training families", "held_out": "held-out families"}
    for sp, m in bf["splits"].items():
        block(labels.get(sp, sp), sp, m)
    block("all", "", bf["all"])
    return "\n".join(lines)


def format_paired_table(rows, baseline_rows, settings) -> str | None:
    """Each setting of ``rows`` against the same setting of ``baseline_rows``, paired per example
    (:func:`pskernels.synthesis.evaluate.paired_comparison`): the training families, the held-out ones and all.
    None when no example of ``rows`` is in ``baseline_rows`` with one of ``settings``."""
    from ..synthesis.workflows import split_of

    lines = [f"{'rows':<20}{'setting':<13}{'n':>5}{'top-1':>8}{'baseline':>10}{'difference (se)':>19}"
             f"{'KL ratio (se)':>15}  only it / only baseline (p)"]
    groups = [("training families", "train"), ("held-out families", "held_out"), ("all", None)]
    for label, split in groups:
        chosen = [r for r in rows if split is None or split_of(r) == split]
        for s in settings:
            c = evaluation.paired_comparison(chosen, baseline_rows, s)
            if c is None:
                continue
            d, k = c["top1_difference"], c["kl_ratio"]
            lines.append(f"{label:<20}{s:<13}{c['n']:>5}{c['top1']:>8.3f}{c['baseline_top1']:>10.3f}"
                         f"{_with_error(f'{d[0]:+.4f}', d[1], '.4f'):>19}"
                         f"{'-' if k is None else _with_error(f'{k[0]:.2f}x', k[1], '.2f'):>15}"
                         f"  {_discordance(c['answers'])}")
    return "\n".join(lines) if len(lines) > 1 else None
