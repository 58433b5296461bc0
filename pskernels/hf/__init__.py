"""Hugging Face integration: ``patch_model``, ``unpatch_model``, ``ParallelCache``."""
from .cache import SCHEMES, ParallelCache
from .patch import PatchHandle, patch_model, unpatch_model

__all__ = ["ParallelCache", "patch_model", "unpatch_model", "PatchHandle", "SCHEMES"]
