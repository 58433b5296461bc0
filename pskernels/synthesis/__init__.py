"""The Parallel-Synthesis pipeline: cache mapper, LoRA adapter, models, workflow, distillation training, evaluation.

``Synthesizer`` (:mod:`pskernels.synthesis.synthesize`) loads a shipped or trained synthesizer and builds its cache
over the workers' branches; imported on first use (it needs transformers and peft).
"""
from .mapper import CacheMapper, CacheMapperConfig

__all__ = ["CacheMapper", "CacheMapperConfig", "Synthesizer"]


def __getattr__(name):
    if name == "Synthesizer":
        from .synthesize import Synthesizer

        return Synthesizer
    raise AttributeError(f"module 'pskernels.synthesis' has no attribute {name!r}")
