"""Command line: ``pskernels info | demo | bench ttft | bench workflow | train | eval``."""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import signal
import sys

from .argtypes import int_at_least, positive_seconds


def info() -> dict:
    import torch

    from .. import __version__
    from ..ops import available_backends

    def version(mod):
        try:
            return importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001 - report any import failure as "not installed"
            return None

    try:
        importlib.import_module("pskernels._C")
        ext = "built"
    except ImportError:
        ext = "not built (ops use the Triton / PyTorch backends)"
    return {
        "pskernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "triton": version("triton"),
        "transformers": version("transformers"),
        "flash_attn": version("flash_attn"),
        "available_backends": available_backends(),
        "extension": ext,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pskernels", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("info", help="versions, available backends, extension status")
    i.add_argument("--kernels", action="store_true",
                   help="also AOT-compile the Triton kernels for sm_80/sm_90: registers, spills, shared memory")
    d = sub.add_parser("demo", help="Parallel-Synthesis vs text concatenation (answers, TTFT)")
    d.add_argument("--model", default="smollm2",
                   help="'smollm2' (default, real model), 'tiny' (random Llama + oracle check) or an HF model folder")
    d.add_argument("--branches", type=int_at_least(1), default=4, help="(tiny) number of branches")
    d.add_argument("--branch-len", type=int_at_least(1), default=256, help="(tiny) tokens per branch")
    d.add_argument("--prefix-len", type=int_at_least(1), default=64, help="(tiny) prefix tokens")
    d.add_argument("--query-len", type=int_at_least(1), default=16, help="(tiny) synthesis prompt tokens")
    d.add_argument("--repeats", type=int_at_least(1), default=3)
    syn = d.add_mutually_exclusive_group()
    syn.add_argument("--mapper", metavar="PATH", help="synthesizer reads the caches through this trained mapper: a "
                     "CacheMapper.save_pretrained folder or a `pskernels train --out` folder (mapper + LoRA adapter); "
                     "omitted: the checkpoint shipped for --model, if any")
    syn.add_argument("--untrained", action="store_true",
                     help="the synthesizer is the base model (ignore the shipped checkpoint)")
    d.add_argument("--recompute-synthesizer", dest="recomputed_synthesis", action="store_true",
                   help="also synthesize (c): the synthesizer shipped for recomputed branches, reading them as it "
                   "was trained (some tokens of each branch recomputed in text order by the base model; --untrained "
                   "or none shipped: the base model with each worker's instruction recomputed); more faithful, slower "
                   "to its first token (docs/FIDELITY.md)")
    d.add_argument("--head-share", type=float, default=None, metavar="F",
                   help="recomputed heads grow with long branches: at least the share F (0..1) of each branch "
                   "(with --recompute-synthesizer or a --mapper trained on recomputed branches; default: the "
                   "synthesizer's own, 0.4 for the shipped recompute synthesizer; docs/FIDELITY.md)")
    d.add_argument("--json", action="store_true", help="print the results as JSON")
    d.add_argument("--processes", type=int, metavar="N", help="workers in other processes: N local processes over "
                   "gloo (rank 0 synthesizes, ranks 1..N-1 are workers that send their branch caches); under torchrun "
                   "the launcher's ranks are used instead (docs/DISTRIBUTED.md)")
    d.add_argument("--timeout", type=positive_seconds, default=300.0, help="(--processes / torchrun) seconds rank 0 "
                   "waits for the workers' branches; a worker not heard from by then is listed as missing")
    d.add_argument("--worker-tokens", type=int, default=None, help="new tokens per worker (default 64; the "
                   "single-process --model tiny demo takes --branch-len instead)")
    d.add_argument("--answer-tokens", type=int, default=None, help="tokens of each answer (default 80; not in the "
                   "single-process --model tiny demo)")
    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    t = bsub.add_parser("ttft", help="time to first token: text concatenation vs Parallel-Synthesis vs floor")
    t.add_argument("--model", default="smollm2", help="'smollm2' (default), 'tiny' or an HF model folder")
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    t.add_argument("--branches", type=int_at_least(1), default=4)
    t.add_argument("--branch-len", type=int_at_least(1), default=256)
    t.add_argument("--prefix-len", type=int_at_least(1), default=64)
    t.add_argument("--query-len", type=int_at_least(1), default=32)
    t.add_argument("--repeats", type=int_at_least(1), default=5)
    t.add_argument("--recompute", type=int_at_least(0), default=0, metavar="HEAD",
                   help="also time Parallel-Synthesis with the first HEAD tokens of each branch recomputed in text "
                   "order (the training-free fidelity knob, docs/FIDELITY.md)")
    t.add_argument("--recompute-together", action="store_true",
                   help="(--recompute) each head reads the workers' own K/V before it, not the earlier heads' "
                   "recomputation (the approximation run H48 was trained with)")
    t.add_argument("--json", metavar="FILE", help="write the results as JSON")
    t.add_argument("--plot", metavar="PNG", help="also sweep branches 1,2,4,8 and draw TTFT curves")
    from .bench_workflow import add_workflow_args
    from .evaluate import add_eval_args
    from .train import add_train_args

    add_workflow_args(bsub.add_parser("workflow", help="the whole agent workflow (prefix, N workers, synthesis): "
                                      "stock Hugging Face vs pskernels, per phase, with KV memory"))
    add_train_args(sub.add_parser("train", help="train the cache mapper + LoRA synthesizer adapter"))
    add_eval_args(sub.add_parser("eval", help="text concatenation vs parallel synthesis (untrained, APE, trained)"))
    args = p.parse_args(argv)
    if args.cmd == "info":
        for k, v in info().items():
            print(f"{k:>20}: {v}")
        if args.kernels:
            from .kernel_report import main as kernel_report_main

            return kernel_report_main(["--level", "ci"])
        return 0
    if args.cmd == "train":
        from .train import run_train

        return run_train(args)
    if args.cmd == "eval":
        from .evaluate import run_eval

        return run_eval(args)
    if args.cmd == "bench" and args.bench == "workflow":
        from .bench_workflow import main as workflow_main

        return workflow_main(args)
    if args.cmd == "bench":
        from .ttft import main as ttft_main

        return ttft_main(args)
    from .demo_distributed import under_torchrun

    if args.processes is not None or under_torchrun():
        from .demo_distributed import main as distributed_demo_main

        return distributed_demo_main(args)
    from .demo import main as demo_main

    return demo_main(args)


def run(argv=None) -> int:
    """The ``pskernels`` command: :func:`main`, with a bad flag combination (a ValueError whose message names the
    flag, ``--...``) reported as ``pskernels: error: ...`` and exit status 2, as argparse reports its own, instead of
    a traceback; output piped into a reader that stops early (``| head``) ends quietly, as other commands do. Any
    other exception keeps its traceback."""
    try:
        return main(argv)
    except ValueError as e:
        if not str(e).startswith("--"):
            raise
        print(f"pskernels: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # what is left in stdout's buffer has no reader: point it at devnull so that flushing it at exit is silent
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(run())
