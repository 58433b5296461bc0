"""``pskernels eval``: text concatenation vs Parallel-Synthesis on held-out examples
(:mod:`pskernels.synthesis.evaluate`), untrained, APE-calibrated and trained.

The 'trained' row reads ``--checkpoint DIR`` (a ``pskernels train --out`` folder or an exported checkpoint);
without it, the checkpoint shipped for ``--model`` (:func:`pskernels.synthesis.checkpoints.shipped_checkpoint`),
if any; ``--untrained``: no 'trained' row. A checkpoint of another model is refused
(:func:`pskernels.synthesis.checkpoints.load_checkpoint`).

Workflow suites (tasks drawn from :mod:`pskernels.synthesis.families`, played by the model in
:mod:`pskernels.synthesis.workflows`, docs/FIDELITY.md):

* ``--make-suite OUT.jsonl`` writes workflow examples (the model plays the workers) and exits:
  ``--per-family N --seed S --families all|train|held_out|NAME,... --worker-tokens K --workers LO,HI``
  (``--jobs N``: N processes, the same file);
* ``--suite FILE`` (``--suite`` alone: the packaged suite, :data:`pskernels.synthesis.checkpoints.DEFAULT_SUITE`;
  ``--suite long`` / ``--suite held-out``: the others, :data:`pskernels.synthesis.checkpoints.NAMED_SUITES`)
  evaluates such a file and prints, after the overall table, one block per family and the training-family,
  held-out-family and overall rows (``--by-family`` prints them for ``--data`` / ``--builder`` too;
  ``--families`` keeps only some families);
* ``--calibrate-ape [FILE]`` replaces the fixed APE setting (T = S = 0.9) by the one
  :func:`pskernels.synthesis.calibration.calibrate_ape` picks on the first ``--calibrate-n`` examples of FILE
  (without FILE: training-family workflows built by the model, seed 1);
* ``--results A.json B.json ...`` prints the tables of results stored with ``--json`` again, their examples pooled
  (:func:`load_results`; ``--families`` keeps only some), without loading a model; ``--against C.json ...``
  compares them with other stored results on the same examples, paired
  (:func:`pskernels.apps.eval_tables.format_paired_table`), e.g. the same suite evaluated at two dtypes (``--dtype``).

``--dtype bfloat16`` (or ``float16``) evaluates with the base model, teacher included, in that dtype, as it runs on
a GPU; ``--make-suite --dtype`` builds in it. A suite's stored teacher continuations are used by a teacher of the
dtype they were decoded in (:func:`pskernels.synthesis.distill.stored_teacher_ids`; the packaged suites': float32);
at another dtype the teacher decodes its own.

Also ``python -m pskernels.apps.evaluate ...`` (the same flags).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import torch

from ..synthesis import checkpoints
from ..synthesis import evaluate as evaluation
from ..synthesis.data import build, load_jsonl, save_jsonl
from ..synthesis.distill import stored_teacher_dtype
from ..synthesis.models import load_model
from .argtypes import int_at_least, positive_number
from .eval_tables import RECOMPUTE_NAME, SETTING_NAMES, format_family_table, format_paired_table, format_table


def _select(examples, spec):
    """Keep the examples of the families in ``spec``: a comma-separated list of 'all', 'train', 'held_out' and
    names (a name matches ``workflow:NAME`` or the kind itself). A term no example matches is an error; no
    ``spec`` or 'all' keeps every example."""
    if not spec or spec == "all":
        return examples
    from ..synthesis.workflows import split_of

    terms = [x.strip() for x in spec.split(",") if x.strip()]
    if not terms:
        raise SystemExit("--families: expected 'all', 'train', 'held_out' or family names")

    def matches(ex, term):
        if term == "all":
            return True
        if term in ("train", "held_out"):
            return split_of(ex) == term
        return (ex.get("kind") or "").removeprefix("distill:") in (term, f"workflow:{term}")

    unmatched = [t for t in terms if not any(matches(ex, t) for ex in examples)]
    if unmatched:
        raise SystemExit(f"--families: no example of {', '.join(map(repr, unmatched))} in the evaluated examples")
    return [ex for ex in examples if any(matches(ex, t) for t in terms)]


def _pair(text: str, flag: str):
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"{flag}: expected LO,HI (two integers), got {text!r}") from None
    return lo, hi


def _grid(text: str):
    from ..synthesis.calibration import ape_grid

    try:
        ts, ss = text.split("/")
        return ape_grid([float(x) for x in ts.split(",")], [float(x) for x in ss.split(",")])
    except ValueError:
        raise SystemExit(f"--ape-grid: expected T,T,.../S,S,... (e.g. 0.8,0.9,1/0.8,0.9,1), got {text!r}") from None


def _exit_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Exit this process once ``parent_pid`` is gone: a ``--jobs`` parent killed by a signal cannot stop its
    spawned workers, and they would otherwise generate on for minutes, holding the cores."""
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    os._exit(1)


def _build_shard(model_name: str, dtype: str, threads: int | None, shard: tuple, kwargs: dict,
                 parent_pid: int | None = None) -> list:
    """One ``--jobs`` process: load the model in ``dtype``, build every ``shard[1]``-th example from ``shard[0]``
    (``parent_pid``: a spawned worker, which exits when that process does)."""
    from ..synthesis.workflows import build_workflows

    if parent_pid is not None:
        threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    if threads:
        torch.set_num_threads(threads)
    model, tok = load_model(model_name, dtype=getattr(torch, dtype))
    k, n = shard
    t0 = time.perf_counter()

    def progress(i, total, ex):
        print(f"[job {k + 1}/{n}: {i + 1}/{total}] {ex['id']} ({len(ex['branches'])} workers, "
              f"{time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    return build_workflows(model, tok, progress=progress, shard=shard, **kwargs)


def make_suite(args) -> int:
    """``--make-suite OUT``: workflow examples generated by ``--model`` (the workers), written as JSONL; with
    ``--jobs N``, N processes (spawned, each loading the model) build every N-th example and the outputs are
    interleaved back into the order of one process (the same file)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from ..synthesis.families import draw_workflows

    seed = 0 if args.seed is None else args.seed
    kwargs = dict(families=args.families or "all", n_per_family=args.per_family, seed=seed,
                  worker_tokens=args.worker_tokens, n_workers=_pair(args.workers, "--workers"),
                  teacher_tokens=args.store_teacher)
    try:  # the draw alone (no model): bad families / worker ranges are reported before any process starts
        n_examples = len(draw_workflows(kwargs["families"], args.per_family, seed=seed, n_workers=kwargs["n_workers"]))
    except ValueError as e:
        raise SystemExit(f"--make-suite: {e}") from None
    jobs = max(1, min(args.jobs, n_examples))
    t0 = time.perf_counter()
    try:
        if jobs == 1:
            examples = _build_shard(args.model, args.dtype, args.threads, (0, 1), kwargs)
        else:
            with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
                parts = list(pool.map(_build_shard, [args.model] * jobs, [args.dtype] * jobs, [args.threads] * jobs,
                                      [(k, jobs) for k in range(jobs)], [kwargs] * jobs, [os.getpid()] * jobs))
            examples = [parts[i % jobs][i // jobs] for i in range(n_examples)]
    except ValueError as e:
        raise SystemExit(f"--make-suite: {e}") from None
    save_jsonl(examples, args.make_suite)
    print(f"wrote {len(examples)} workflow examples ({args.per_family} per family, seed {seed}, model {args.model} "
          f"({args.dtype}), {args.worker_tokens} worker tokens, {jobs} job{'s' if jobs > 1 else ''}) to "
          f"{args.make_suite} in {time.perf_counter() - t0:.1f} s")
    return 0


DTYPES = ("float32", "bfloat16", "float16")


def add_eval_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    settings = evaluation.SETTINGS
    p.add_argument("--model", default="smollm2", help="'smollm2', 'tiny' or an HF folder (the base model)")
    ck = p.add_mutually_exclusive_group()
    ck.add_argument("--checkpoint", default=None, help="the 'trained' row's checkpoint: a folder written by `pskernels "
                    "train --out` or export_checkpoint (omit: the checkpoint shipped for --model, if any)")
    ck.add_argument("--untrained", action="store_true", help="no 'trained' row (ignore the shipped checkpoint)")
    ck.add_argument("--recompute-synthesizer", action="store_true",
                    help="the 'trained' row is the synthesizer shipped for --model that was trained on branches with "
                    "some of their tokens recomputed (it reads them so: more faithful, slower to its first token)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="held-out examples (JSONL); all lines are evaluated")
    src.add_argument("--builder", default="aggregation", help="aggregation | exposure | distill | mixed")
    src.add_argument("--suite", metavar="FILE", nargs="?", const=str(checkpoints.DEFAULT_SUITE),
                     help="a workflow suite (JSONL, see --make-suite; no FILE: the packaged suite "
                     f"{checkpoints.DEFAULT_SUITE}; 'long': the packaged suite of long worker outputs, "
                     f"{checkpoints.LONG_SUITE.name}; 'held-out': 12 workflows of each held-out family, "
                     f"{checkpoints.HELD_OUT_SUITE.name}): all lines are "
                     "evaluated; per-family, training-family, held-out-family and overall rows are printed")
    src.add_argument("--results", nargs="+", metavar="JSON", help="print the tables of results stored with --json "
                     "instead of evaluating (several files: their examples pooled, e.g. the suites of one "
                     "synthesizer; each with the same settings, no example twice)")
    p.add_argument("--against", nargs="+", metavar="JSON", help="(--results) also compare each setting with the same "
                   "setting of these stored results, paired per example (e.g. two checkpoints on the same suites): "
                   "top-1 difference and KL ratio with standard errors, greedy answers only one of them states")
    src.add_argument("--make-suite", metavar="OUT", help="write a workflow suite (the model plays the workers) to "
                     "OUT (JSONL) and exit without evaluating")
    p.add_argument("--n-examples", type=int_at_least(1), default=32, help="(builder) held-out examples")
    p.add_argument("--seed", type=int, default=None,
                   help="(builder) seed; default: the training seed + 1. (--make-suite) default 0")
    p.add_argument("--families", default=None, help="'all', 'train', 'held_out' or comma-separated family "
                   "names: (--make-suite) the families to build, default all; (--suite, --data, --results) keep only "
                   "those")
    p.add_argument("--by-family", action="store_true", help="(--data, --builder) also print the per-kind table")
    p.add_argument("--per-family", type=int_at_least(1), default=4, help="(--make-suite) examples per family")
    p.add_argument("--jobs", type=int_at_least(1), default=1, help="(--make-suite) processes building the examples "
                   "(each loads the model; give --threads too, e.g. --jobs 2 --threads 1 on 2 cores); the file is "
                   "the same")
    p.add_argument("--worker-tokens", type=int_at_least(1), default=48,
                   help="(--make-suite) tokens each worker generates")
    p.add_argument("--workers", default="2,8", help="(--make-suite) LO,HI workers per example (inclusive)")
    p.add_argument("--store-teacher", type=int, default=16, metavar="N",
                   help="(--make-suite) also store the teacher's greedy continuation (N tokens at most) with each "
                   "example, so that training and evaluation skip decoding it (checked against the teacher's "
                   "logits when used); 0: do not")
    p.add_argument("--calibrate-ape", metavar="FILE", nargs="?", const="",
                   help="calibrate the APE setting's T and S on the first --calibrate-n examples of FILE (JSONL; "
                   "never the evaluated examples) instead of T = S = 0.9; without FILE on training-family workflows "
                   "the model builds itself (seed 1)")
    p.add_argument("--calibrate-n", type=int_at_least(1), default=8, help="(--calibrate-ape) calibration examples")
    p.add_argument("--ape-grid", default=None, help="(--calibrate-ape) T,T,.../S,S,... "
                   "(default 0.7,0.8,0.9,1.0/0.7,0.8,0.9,1.0)")
    p.add_argument("--scheme", default=None, help="default: the checkpoint's scheme, else sequential")
    p.add_argument("--settings", default=",".join(evaluation.DEFAULT_SETTINGS),
                   help="comma-separated subset of " + ",".join(settings) + " (text_concat is always computed; "
                   "default: all but recompute)")
    p.add_argument("--recompute", default="{},{}".format(*evaluation.RECOMPUTE), metavar="HEAD[,TAIL]",
                   help="(setting recompute) tokens recomputed in text order at the start (and end) of each branch; "
                   "HEAD 'prompt': each worker's own turn (workflow examples)")
    p.add_argument("--head-share", type=float, default=None, metavar="F",
                   help="the recompute setting and a synthesizer trained on recomputed branches recompute at least "
                   "the share F (0..1) of each branch: the head grows with long branches, max(HEAD, ceil(F x "
                   "tokens)); 0: the head as given / as trained; default: the checkpoint's own (0.4 for the shipped "
                   "recompute synthesizer), 0 for the recompute setting")
    p.add_argument("--recompute-together", action="store_true",
                   help="(setting recompute) each recomputed part reads the workers' own K/V before it, not the "
                   "earlier parts' recomputation (the approximation run H48 was trained with; the exact text-order "
                   "recomputation is one forward too)")
    p.add_argument("--exact-recompute", action="store_true",
                   help="a synthesizer trained with --recompute-together (run H48) reads its recomputed parts in "
                   "exact text order instead, each over the parts recomputed before it (one forward all the same)")
    p.add_argument("--trained-tail", type=int_at_least(0), default=None, metavar="N",
                   help="a synthesizer trained on recomputed branches also recomputes the last N tokens of each branch "
                   "(in the order it recomputes its heads; default: the tail it was trained with, 0 for the shipped "
                   "recompute synthesizer)")
    p.add_argument("--gen-tokens", type=int_at_least(1), default=12)
    p.add_argument("--answer-samples", type=int_at_least(0), default=0, metavar="N",
                   help="also sample N continuations per setting and example with an answer (the same seeds for "
                   "every setting) and report the share that state it ('sampled' column) and, paired per example, its "
                   "difference to text concatenation's ('vs text' column, points and standard error)")
    p.add_argument("--temperature", type=positive_number, default=1.0,
                   help="(--answer-samples) sampling temperature")
    p.add_argument("--sample-seed", type=int, default=0, help="(--answer-samples) seed of the samples")
    p.add_argument("--target-tokens", type=int_at_least(1), default=16)
    p.add_argument("--json", default=None, help="also write the results (with per-example outputs) to this file")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="the base model's dtype, teacher included, e.g. bfloat16 as it runs on a GPU (--make-suite: "
                   "the model that builds the suite); a trained synthesizer's modules keep theirs (peft and the mapper "
                   "cast). A suite's stored teachers (the packaged suites': float32) are used in the dtype they were "
                   "decoded in; in another, the teacher decodes its own")
    p.add_argument("--threads", type=int, default=None)
    return p


def _share_label(share: float) -> str:
    return f", head share {share:g}" if share else ""


def _order_label(together: bool) -> str:
    """How a row's recomputed parts read the branches before them: nothing said for the exact text order."""
    return " (over workers' K/V)" if together else ""


def parse_recompute(text: str) -> tuple:
    """``--recompute HEAD[,TAIL]`` as ``(head, tail)`` (head ``'prompt'`` or tokens)."""
    parts = text.split(",")
    try:
        head = parts[0] if parts[0] == "prompt" else int(parts[0])
        tail = int(parts[1]) if len(parts) == 2 else 0
    except ValueError:
        head = tail = None
    if len(parts) > 2 or head is None or tail < 0 or (head != "prompt" and (head < 0 or head + tail == 0)):
        raise SystemExit(f"--recompute: expected HEAD or HEAD,TAIL (tokens >= 0, not all 0; HEAD may be 'prompt'), "
                         f"got {text!r}")
    return head, tail


def _key(ex):
    return json.dumps([ex["prefix"], ex["branches"], ex["prompt"]])


def resolve_checkpoint(args) -> tuple[str | None, str]:
    """``(path, how)``: the 'trained' row's checkpoint (None: no row) and how it was chosen."""
    if getattr(args, "untrained", False):
        return None, "none (--untrained)"
    if args.checkpoint:
        return args.checkpoint, f"{args.checkpoint} (--checkpoint)"
    if getattr(args, "recompute_synthesizer", False):
        shipped = checkpoints.shipped_checkpoint(args.model, recompute=True)
        if shipped is None:
            raise SystemExit(f"--recompute-synthesizer: no synthesizer trained on recomputed branches is shipped for "
                             f"--model {args.model}")
        return str(shipped), f"{shipped} (--recompute-synthesizer)"
    shipped = checkpoints.shipped_checkpoint(args.model)
    if shipped is not None:
        return str(shipped), f"{shipped} (shipped for --model {args.model}; --untrained: none)"
    return None, f"none (no checkpoint shipped for --model {args.model}; --checkpoint DIR)"


def _resolve_suite(suite: str) -> str:
    """``--suite`` as a path: a file by that name, else a packaged suite's name (``long``, ``held-out``)."""
    if suite in checkpoints.NAMED_SUITES and not os.path.exists(suite):
        suite = str(checkpoints.NAMED_SUITES[suite])
    packaged = [checkpoints.DEFAULT_SUITE, *checkpoints.NAMED_SUITES.values()]
    if os.path.isfile(suite):
        return suite
    if os.path.abspath(suite) in {os.path.abspath(p) for p in packaged}:
        raise SystemExit(f"--suite: the packaged suite {suite} is missing (this installation has no workflow "
                         "suite; give --suite FILE, or write one with --make-suite FILE)")
    raise SystemExit(f"--suite: no such file {suite}")


def load_results(paths, families: str | None = None) -> tuple[dict, dict]:
    """The :func:`pskernels.synthesis.evaluate.evaluate` results stored in ``paths`` (``--json`` files) as one,
    their examples pooled (``families``: only those of these families, as ``--families`` selects) and aggregated
    again (with their ``dtype``), and the row labels stored with them. Refuses, naming the file,
    files whose settings, row labels, checkpoint (its folder's name) or dtype differ from the first's and an example
    (its ``id``) stored twice. A file stored without row labels (before ``eval`` wrote them) pools with any."""
    rows, first, seen = [], None, {}
    labels, labelled = None, None  # the first stored row labels and their file
    for path in paths:
        try:
            with open(path) as f:
                stored = json.load(f)
            examples = stored["examples"]
            what = {"settings": list(examples[0]["scores"]) if examples else [],
                    "checkpoint": os.path.basename(os.path.normpath(stored["checkpoint"]))
                    if stored.get("checkpoint") else None,
                    "dtype": stored.get("dtype", "float32")}  # files stored before --dtype were float32's
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise SystemExit(f"--results {path}: expected a file written by `pskernels eval --json` ({e!r})") from None
        first = first or what
        for k, v in what.items():
            if v != first[k]:
                raise SystemExit(f"--results {path}: expected the {k} of {paths[0]}, {first[k]}, got {v}")
        if stored.get("names"):  # files stored before eval wrote its labels have none
            if labels is not None and stored["names"] != labels:
                raise SystemExit(f"--results {path}: expected the row labels of {labelled}, {labels}, got "
                                 f"{stored['names']}")
            labels, labelled = stored["names"], labelled or path
        for key in filter(None, (r.get("id") for r in examples)):
            if key in seen:
                raise SystemExit(f"--results {path}: example {key!r} is also in {seen[key]}; pool each example once")
            seen[key] = path
        rows.extend(examples)
    rows = _select(rows, families)
    out = evaluation.aggregate(rows, first["settings"])
    out["examples"] = rows
    out["dtype"] = first["dtype"]
    return out, labels or {}


def print_results(args) -> int:
    r, names = load_results(args.results, getattr(args, "families", None))
    print(f"{len(args.results)} stored result(s), {r['dtype']}: {', '.join(args.results)}")
    print(format_table(r, names))
    print()
    print(format_family_table(evaluation.by_family(r)))
    against = getattr(args, "against", None)
    if against:
        base, _ = load_results(against, getattr(args, "families", None))
        # text concatenation is its own teacher: compared only with another dtype's, e.g. its greedy answers
        same_teacher = r["dtype"] == base["dtype"]
        settings = [s for s in evaluation.SETTINGS
                    if s in r and s in base and not (s == "text_concat" and same_teacher)]
        table = format_paired_table(r["examples"], base["examples"], settings)
        if table is None:
            raise SystemExit(f"--against: no example of {', '.join(args.results)} is in {', '.join(against)} "
                             "with the same setting")
        print()
        print(f"paired against {len(against)} stored result(s), {base['dtype']}: {', '.join(against)} (the same "
              "examples, by id" + ("" if same_teacher else "; KL and top-1 of each against its own dtype's teacher")
              + ")")
        print(table)
    return 0


def run_eval(args) -> int:
    if getattr(args, "make_suite", None):
        return make_suite(args)
    if getattr(args, "results", None):
        return print_results(args)
    if getattr(args, "against", None):
        raise SystemExit("--against: compares stored results; give the results to compare with --results")
    suite = getattr(args, "suite", None)
    if suite:
        suite = _resolve_suite(suite)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = [x.strip() for x in args.settings.split(",") if x.strip()]
    bad = set(settings) - set(evaluation.SETTINGS)
    if bad:
        raise SystemExit(f"--settings: unknown {sorted(bad)}, expected some of {evaluation.SETTINGS}")
    recompute = parse_recompute(args.recompute) if "recompute" in settings else evaluation.RECOMPUTE
    if args.head_share is not None and not 0.0 <= args.head_share <= 1.0:
        raise SystemExit(f"--head-share: expected a share in [0, 1], got {args.head_share:g}")
    checkpoint, checkpoint_how = resolve_checkpoint(args)
    try:
        cfg = checkpoints.checkpoint_train_config(checkpoint) if checkpoint else {}
    except ValueError as e:
        raise SystemExit(str(e)) from None
    trained_recompute = checkpoints.trained_recompute(checkpoint)
    if args.exact_recompute:
        if not (trained_recompute and trained_recompute[2] and "trained" in settings):
            raise SystemExit(f"--exact-recompute: expected a trained setting whose synthesizer recomputes each part "
                             f"over the workers' K/V (--recompute-together), got checkpoint {checkpoint} trained "
                             f"with recompute {trained_recompute} and settings {','.join(settings)}")
        trained_recompute = (*trained_recompute[:2], False)
    if args.trained_tail is not None:
        if not (trained_recompute and "trained" in settings):
            raise SystemExit(f"--trained-tail {args.trained_tail}: expected a trained setting whose synthesizer "
                             "recomputes its branches (--recompute-synthesizer or such a --checkpoint), got "
                             f"checkpoint {checkpoint} trained with recompute {trained_recompute} and settings "
                             f"{','.join(settings)}")
        trained_recompute = (trained_recompute[0], args.trained_tail, trained_recompute[2])
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    if checkpoint:  # refuse a checkpoint of another model before any evaluation work
        try:
            checkpoints.check_checkpoint(model, checkpoint)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(str(e)) from None
    if args.data or suite:
        examples = load_jsonl(args.data or suite)
    else:
        seed = args.seed if args.seed is not None else cfg.get("seed", 0) + 1
        examples = build(args.builder, args.n_examples, seed=seed)
    examples = _select(examples, getattr(args, "families", None))
    other_dtype = sum(stored_teacher_dtype(ex) not in (None, args.dtype) for ex in examples)
    if other_dtype:
        print(f"--dtype {args.dtype}: {other_dtype} stored teacher continuation(s) not used (decoded in another "
              "dtype); the teacher decodes its own")
    scheme = args.scheme or cfg.get("scheme", "sequential")
    ape, names, calibration = None, {}, None
    cal_source = getattr(args, "calibrate_ape", None)
    if cal_source is not None:
        from ..synthesis.calibration import DEFAULT_GRID, calibrate_ape

        if cal_source:
            cal = load_jsonl(cal_source)[: args.calibrate_n]
        else:  # built by the model itself, training families, seed 1 (the evaluated suites use other seeds)
            from ..synthesis.calibration import calibration_examples

            cal_source = f"the training families (seed 1, built by {args.model})"
            cal = calibration_examples(model, tok, args.calibrate_n, seed=1)
        overlap = {_key(ex) for ex in cal} & {_key(ex) for ex in examples}
        if overlap:
            raise SystemExit(f"--calibrate-ape {cal_source}: {len(overlap)} calibration example(s) are also "
                             "evaluated; calibrate on other examples (e.g. a suite of the training families with "
                             "another --seed)")
        grid = _grid(args.ape_grid) if args.ape_grid else DEFAULT_GRID
        ape, calibration = calibrate_ape(model, tok, cal, grid=grid, scheme=scheme, target_tokens=args.target_tokens,
                                         max_examples=None)
        names["ape"] = f"(iii) APE calibrated (T={calibration['temperature']:g}, S={calibration['lse_scale']:g})"
    mapper, checkpoint_loaded = None, False
    trained_share = 0.0
    if trained_recompute:  # the synthesizer was trained to read its branches so
        trained_share = checkpoints.trained_head_share(checkpoint) if args.head_share is None else args.head_share
        names["trained"] = "(iv) trained + recomputed {},{}".format(*trained_recompute[:2]) \
            + _share_label(trained_share) + _order_label(trained_recompute[2]) \
            + (" in exact text order" if args.exact_recompute else "")
    if args.head_share and "recompute" not in settings and not (trained_recompute and "trained" in settings):
        raise SystemExit(f"--head-share {args.head_share:g}: nothing recomputes here; it applies to the recompute "
                         "setting (--settings ...,recompute) and to a synthesizer trained on recomputed branches "
                         "(--recompute-synthesizer or such a --checkpoint)")
    if checkpoint and "trained" in settings:
        model, mapper = checkpoints.load_checkpoint(model, checkpoint)
        checkpoint_loaded = True
    elif checkpoint:
        checkpoint_how += ", not evaluated (--settings without trained)"
    r = evaluation.evaluate(model, tok, examples, mapper=mapper, trained=checkpoint_loaded, scheme=scheme,
                            settings=["text_concat"] + [x for x in settings if x != "text_concat"],
                            gen_tokens=args.gen_tokens, target_tokens=args.target_tokens, ape=ape,
                            recompute=recompute, recompute_together=args.recompute_together,
                            trained_recompute=trained_recompute, head_share=args.head_share or 0.0,
                            trained_head_share=trained_share, answer_samples=args.answer_samples,
                            temperature=args.temperature, sample_seed=args.sample_seed)
    names["recompute"] = RECOMPUTE_NAME.format(*recompute) + _share_label(args.head_share or 0.0) + \
        _order_label(args.recompute_together)
    print(f"model {args.model} ({args.dtype}), scheme {scheme}")
    print(f"trained row: checkpoint {checkpoint_how}")
    if calibration is not None:
        print(f"APE calibrated on {calibration['examples']} examples of {cal_source} "
              f"({len(calibration['grid'])} grid points): T = {calibration['temperature']:g}, "
              f"S = {calibration['lse_scale']:g}, calibration KL {calibration['kl']:.4f}")
    print(format_table(r, names))
    if calibration is not None:
        r["ape_calibration"] = calibration
    if suite or getattr(args, "by_family", False):
        bf = evaluation.by_family(r)
        print()
        print(format_family_table(bf))
        r["by_family"] = bf
    if args.json:
        r["checkpoint"] = checkpoint
        r["dtype"] = args.dtype
        r["head_share"] = {"recompute": args.head_share or 0.0, "trained": trained_share}
        r["recomputation"] = {  # [head, tail, together]: together = over the workers' K/V, else exact text order
            "recompute": [*recompute, bool(args.recompute_together)] if "recompute" in settings else None,
            "trained": list(trained_recompute) if trained_recompute and "trained" in settings else None}
        r["names"] = {s: names.get(s, SETTING_NAMES[s]) for s in evaluation.SETTINGS if s in r}
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


def main(argv=None) -> int:
    p = add_eval_args(argparse.ArgumentParser(prog="pskernels eval",
                                              description=evaluation.__doc__.split("\n")[0]))
    return run_eval(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
