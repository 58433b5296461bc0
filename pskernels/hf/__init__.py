"""Hugging Face integration: ``patch_model``, ``unpatch_model``, ``ParallelCache``."""
from .cache import SCHEMES, CacheRow, ParallelCache
from .patch import PatchHandle, patch_model, unpatch_model

__all__ = ["ParallelCache", "CacheRow", "patch_model", "unpatch_model", "PatchHandle", "SCHEMES"]
