"""What the Triton launchers share: the mode the kernels run in, input checks, output allocation, and the
ahead-of-time compile specs each kernel module publishes for :mod:`pskernels.apps.kernel_report`."""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton

# @triton.jit builds interpreted functions instead of compiled kernels when TRITON_INTERPRET is set as the kernels
# are defined (on import of this package), so the mode is read once, here, with Triton's own reading of the switch.
MODE = "interpreter" if triton.knobs.runtime.interpret else "compiled"


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids. Triton's own ``triton.cdiv`` is a constexpr function whose host-side
    call costs microseconds, several per layer call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for 0), as ``triton.next_power_of_2`` without its call cost."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def available() -> bool:
    """Whether the triton backend can run here: on a CUDA device, or on CPU tensors through the interpreter."""
    return MODE == "interpreter" or torch.cuda.is_available()


def on_gpu(device: torch.device) -> bool:
    """Real GPU launch (autotuned configs) as opposed to the interpreter."""
    return device.type == "cuda" and MODE == "compiled"


def empty(shape, dtype, device) -> torch.Tensor:
    # PSKERNELS_DEBUG_NAN=1 poisons library-allocated outputs so that a missed write shows up as NaN.
    if os.environ.get("PSKERNELS_DEBUG_NAN") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def check_inputs(op: str, tensors) -> None:
    # once per layer call over every segment's K and V: cheap attributes first, the diagnosis only on a refusal
    compiled, grad = MODE == "compiled", torch.is_grad_enabled()
    for t in tensors:
        if t is not None and ((compiled and not t.is_cuda) or t.dtype is torch.float64 or (grad and t.requires_grad)):
            _refuse(op, t)


def _refuse(op: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda" and MODE == "compiled":
        raise RuntimeError(f"{op}: the triton backend needs CUDA tensors (got {t.device}); CPU tensors run only "
                           "under TRITON_INTERPRET=1 set before triton is imported")
    if t.dtype == torch.float64:
        raise NotImplementedError(f"{op}: the triton backend supports float16/bfloat16/float32, got float64; "
                                  "use backend='torch'")
    raise NotImplementedError(f"{op}: the triton backend is forward-only and an input requires grad; "
                              "use backend='torch' for training (or run under torch.no_grad())")


# ------------------------------------------------------------------------------------ ahead-of-time compiles

TENSOR_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # by their Triton type names


class TileConfig(NamedTuple):
    """One launch configuration: the kernel's tile constexprs (e.g. ``{"BLOCK_M": 64, "BLOCK_N": 32}``), warps
    and pipeline stages."""

    blocks: dict
    num_warps: int
    num_stages: int


def fixed_tile(**blocks) -> TileConfig:
    """The tile of a launcher that passes neither num_warps nor num_stages: Triton's defaults (4 warps, 3 stages)."""
    return TileConfig(blocks, 4, 3)


@dataclass(frozen=True)
class CompileSpec:
    """One specialisation of a kernel, for ``triton.compile(ASTSource(...), target=...)`` without a GPU.

    ``signature`` types every parameter of ``kernel`` (``"constexpr"`` for the specialised ones), ``attrs`` marks
    the arguments a launch with aligned torch tensors sees as multiples of 16, ``tiles`` lists the launch configs
    the launcher may use (its default first) and ``maxnreg`` the register cap they run with (None: Triton's)."""

    kernel: object
    variant: str
    signature: dict
    constexprs: dict
    attrs: dict
    tiles: tuple
    maxnreg: int | None = None

    def source(self, tile: TileConfig):
        """The ``triton.compiler.ASTSource`` of this specialisation with ``tile``'s constexprs."""
        return triton.compiler.ASTSource(fn=self.kernel, signature=self.signature,
                                         constexprs={**self.constexprs, **tile.blocks}, attrs=self.attrs)


def kernel_parameters(kernel) -> dict[str, bool]:
    """``name -> is constexpr`` of a ``@triton.jit`` kernel's parameters, in order (compiled or interpreted)."""
    # Triton's own rule: a parameter is constexpr when its annotation says so (a string here, as the kernel
    # modules use postponed annotations)
    return {n: "constexpr" in str(p.annotation) for n, p in inspect.signature(kernel.fn).parameters.items()}


def compile_spec(kernel, variant: str, arg_types: dict[str, str], dtype: str, constexprs: dict, tiles,
                 multiple_of_16=(), maxnreg: int | None = None) -> CompileSpec:
    """A :class:`CompileSpec` checked against the kernel's parameter list.

    ``arg_types`` gives the Triton type of each runtime argument, ``"T"`` standing for ``dtype`` (the element
    type of the attention / cache tensors); a runtime argument may also be specialised to a constant through
    ``constexprs``. ``multiple_of_16`` names the ints (strides) that are multiples of 16 for aligned torch
    tensors; every pointer is 16-byte aligned. A kernel argument without a type or value, or a name that is
    not a kernel argument, raises ``ValueError``: the specs cannot fall behind the kernel."""
    params = kernel_parameters(kernel)
    name = kernel.__name__
    runtime = {n for n, is_const in params.items() if not is_const}
    missing, unknown = runtime - set(arg_types), set(arg_types) - runtime
    if missing or unknown:
        raise ValueError(f"{name}: argument types out of date with the kernel: missing {sorted(missing)}, "
                         f"not runtime arguments {sorted(unknown)}")
    for blocks in [t.blocks for t in tiles] or [{}]:
        given = {**constexprs, **blocks}
        missing = {n for n, is_const in params.items() if is_const} - set(given)
        if missing or set(given) - set(params):
            raise ValueError(f"{name} ({variant}): constexprs without a value {sorted(missing)}, "
                             f"not kernel parameters {sorted(set(given) - set(params))}")
    if set(multiple_of_16) - runtime:
        raise ValueError(f"{name}: multiple_of_16 names non-runtime arguments {sorted(set(multiple_of_16) - runtime)}")
    signature, attrs = {}, {}
    for i, (n, is_const) in enumerate(params.items()):
        if is_const or n in constexprs:
            signature[n] = "constexpr"
            continue
        signature[n] = arg_types[n].replace("T", dtype)
        if signature[n].startswith("*") or n in multiple_of_16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return CompileSpec(kernel, variant, signature, dict(constexprs), attrs, tuple(tiles), maxnreg)
