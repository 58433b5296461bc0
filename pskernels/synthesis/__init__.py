"""The Parallel-Synthesis pipeline: cache mapper, offline model loading, workflow helpers."""
from .mapper import CacheMapper, CacheMapperConfig

__all__ = ["CacheMapper", "CacheMapperConfig"]
