"""A real synthesizer checkpoint of the tiny model for tests: 2 steps of mapper + LoRA training, exported."""
from __future__ import annotations

import json
import shutil

from pskernels.synthesis import checkpoints
from pskernels.synthesis.data import ByteTokenizer, aggregation_examples
from pskernels.synthesis.models import load_model
from pskernels.synthesis.train import TrainConfig, train


def short_examples(n, seed):
    # short pieces keep the byte-level sequences small
    return [{**ex, "prefix": ex["prefix"][:40], "branches": [b[:32] for b in ex["branches"]],
             "prompt": ex["prompt"][-24:], "target": ex["target"][:8]}
            for ex in aggregation_examples(n, seed=seed, n_branches=(2, 2))]


def tiny():
    return load_model("tiny")[0]


def train_run(folder) -> dict:
    """A `pskernels train --out`-style folder: 2 steps of mapper + LoRA training of load_model('tiny')."""
    r = train(tiny(), ByteTokenizer(), short_examples(2, seed=0),
              TrainConfig(steps=2, lr=5e-2, log_every=0, lora_r=4, mapper_rank=4, seed=0, checkpoint_dir=str(folder),
                          config_extra={"model": "tiny"}))
    return {"dir": folder, "model": r["model"], "mapper": r["mapper"]}


def export(run_dir, out):
    return checkpoints.export_checkpoint(run_dir, out, tiny(), extra={"command": "train --steps 2", "seed": 0})


def recomputing_copy(exported, folder, **manifest):
    """A copy of ``exported`` whose synthesizer was (as its manifest says) trained with ``--recompute 2,1``; more
    ``manifest`` entries (e.g. ``head_share``) are written beside."""
    shutil.copytree(exported, folder)
    path = folder / checkpoints.MANIFEST_NAME
    saved = json.loads(path.read_text())
    saved["train_config"]["recompute"] = [2, 1, False]
    path.write_text(json.dumps({**saved, **manifest}))
    return folder
