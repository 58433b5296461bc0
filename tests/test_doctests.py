"""The runnable examples in the public docstrings run and print what they show."""
import doctest
import importlib

import pytest

MODULES = [
    "pskernels.rope",
    "pskernels.ops.dispatch",
    "pskernels.ops.multi_branch_attention",
    "pskernels.ops.merge_states",
    "pskernels.ops.rotate_keys",
    "pskernels.ops.map_kv_caches",
    "pskernels.hf.cache",
    "pskernels.synthesis.answers",
    "pskernels.synthesis.families",
    "pskernels.synthesis.mapper",
    "pskernels.synthesis.recompute",
    "pskernels.synthesis.synthesize",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name}: no examples found"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"


def test_every_public_op_has_an_example():
    import pskernels

    for name in ("multi_branch_attention", "plan_multi_branch_attention", "merge_states", "rotate_keys",
                 "map_kv_caches", "available_backends"):
        assert ">>>" in (getattr(pskernels, name).__doc__ or ""), f"pskernels.{name} has no runnable example"
