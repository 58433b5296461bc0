"""The ``"cpu"`` and ``"cuda"`` backends: the compiled extension ``pskernels._C`` behind every op.

Importing this package loads the extension (:mod:`.loader`; ImportError, with the reason, when it is
unavailable) and registers each op's adapter in :mod:`pskernels._core.registry`. One module per op holds
its adapter (public-API arguments -> ``torch.ops.pskernels.<op>``) and its fake (meta) implementation for
torch.compile; the C++ / CUDA kernels behind it are ``csrc/cpu/<op>.cpp`` and ``csrc/cuda/<op>.cu``.
"""
# Each op module imports .loader first, so the extension (and torch.ops.pskernels.*) is loaded before it is used.
from . import loader, map_kv_caches, merge_states, multi_branch_attention, rotate_keys  # noqa: F401
