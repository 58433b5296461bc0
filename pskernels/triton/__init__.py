"""Triton kernels and thin launchers; importing this package registers ``backend="triton"`` for every op.

One module per op holds that op's kernel, its launcher (registered in :mod:`pskernels._core.registry`) and the
ahead-of-time compile specs of its kernel (``compile_specs``, read by :mod:`pskernels.apps.kernel_report`):
:mod:`.multi_branch_attention`, :mod:`.merge_states`, :mod:`.rotate_keys`, :mod:`.map_kv_caches`. Shared code
sits below them: :mod:`.utils` (the mode the kernels run in, input checks, output allocation, compile specs),
:mod:`.rope_utils` (the RoPE ``@triton.jit`` helpers) and :mod:`.combine` (the log-sum-exp merge helpers and the
combine kernel: ``merge_states`` and the second pass of split-KV attention).

Kernels run on NVIDIA GPUs, and on CPU tensors through the Triton interpreter (``TRITON_INTERPRET=1``, set
before triton is first imported; ``utils.MODE`` says which). The backend is forward-only: launchers refuse
inputs that need gradients (use ``backend="torch"`` for training) and float64 (use ``backend="torch"``).
``PSKERNELS_DEBUG_NAN=1`` fills every output the launchers allocate with NaN, so tests see missed writes.
Without triton installed the import raises ImportError, which tells ``ops`` that the backend is absent.
"""
from . import map_kv_caches, merge_states, multi_branch_attention, rotate_keys  # noqa: F401
