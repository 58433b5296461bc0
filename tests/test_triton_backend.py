"""The triton package itself: the mode its kernels run in, and the compile specs its kernel modules publish."""
import importlib
import os
import pkgutil

import pytest
import torch
import triton
import triton.language as tl

import pskernels.triton
from pskernels.triton.utils import MODE, compile_spec, fixed_tile, kernel_parameters


def _modules():
    return [importlib.import_module(f"pskernels.triton.{m.name}")
            for m in pkgutil.iter_modules(pskernels.triton.__path__)]


def _kernels() -> dict:
    """name -> kernel of every ``@triton.jit`` kernel in the modules of pskernels.triton."""
    return {name: v for mod in _modules() for name, v in vars(mod).items()
            if name.endswith("_kernel") and type(v).__name__ in ("JITFunction", "InterpretedFunction")}


def test_mode_matches_the_machine():
    """On a CUDA machine the kernels are compiled and autotuned, never interpreted: the test setup leaves
    TRITON_INTERPRET unset there. Without CUDA they can only run in the interpreter."""
    if torch.cuda.is_available():
        assert "TRITON_INTERPRET" not in os.environ
        assert MODE == "compiled"
    else:
        assert MODE == "interpreter"


def test_kernels_are_built_in_that_mode():
    kinds = {name: type(k).__name__ for name, k in _kernels().items()}
    want = "InterpretedFunction" if MODE == "interpreter" else "JITFunction"
    assert kinds and set(kinds.values()) == {want}, kinds


def test_compile_specs_cover_every_kernel_with_its_parameters():
    """Each kernel is in some module's ``compile_specs`` (what the kernel report compiles), and each spec types
    every parameter of its kernel, in order, with the launch tiles given."""
    specs = [s for mod in _modules() if hasattr(mod, "compile_specs")
             for dt in ("fp16", "bf16", "fp32") for D in (64, 80, 128) for arch in (80, 90)
             for s in mod.compile_specs(dt, D, arch)]
    assert {s.kernel.__name__ for s in specs} == set(_kernels())
    for s in specs:
        assert list(s.signature) == list(kernel_parameters(s.kernel)) and s.tiles, (s.kernel.__name__, s.variant)


@triton.jit
def _probe(x, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tl.store(x + o, tl.zeros([BLOCK], tl.float32), mask=o < n)


def test_compile_spec_refuses_a_signature_out_of_date():
    tile = [fixed_tile(BLOCK=16)]
    spec = compile_spec(_probe, "v", dict(x="*T", n="i32"), "bf16", {}, tile, multiple_of_16=("n",))
    assert spec.signature == dict(x="*bf16", n="i32", BLOCK="constexpr")
    assert spec.attrs == {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}
    assert compile_spec(_probe, "v", dict(x="*T", n="i32"), "bf16", dict(n=1), tile).signature["n"] == "constexpr"
    with pytest.raises(ValueError, match=r"missing \['n'\]"):  # a kernel argument without a type
        compile_spec(_probe, "v", dict(x="*T"), "bf16", {}, tile)
    with pytest.raises(ValueError, match=r"not runtime arguments \['m'\]"):  # an argument the kernel lacks
        compile_spec(_probe, "v", dict(x="*T", n="i32", m="i32"), "bf16", {}, tile)
    with pytest.raises(ValueError, match=r"without a value \['BLOCK'\]"):
        compile_spec(_probe, "v", dict(x="*T", n="i32"), "bf16", {}, [])
    with pytest.raises(ValueError, match=r"not kernel parameters \['STAGES'\]"):
        compile_spec(_probe, "v", dict(x="*T", n="i32"), "bf16", dict(STAGES=2), tile)
