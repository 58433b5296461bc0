"""The Parallel-Synthesis pipeline: cache mapper, LoRA adapter, models, workflow, distillation training, evaluation."""
from .mapper import CacheMapper, CacheMapperConfig

__all__ = ["CacheMapper", "CacheMapperConfig"]
