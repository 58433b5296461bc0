"""Every tile a GPU may launch the Triton kernels with, on shapes that end inside that tile, against the reference.

On a GPU the autotuner picks the attention kernel's tile (BLOCK_M query rows x BLOCK_N keys) from the list of its
specialisation's tile class (``multi_branch_attention._TILES`` per arch); the interpreter alone would only ever
run the fixed 16 x 16 tile. Here every (BLOCK_M, BLOCK_N) of every class, on sm_80 or sm_90, in half precision
or fp32, runs through the launcher's ``tile`` argument with a specialisation of that class: query rows (G x Lq
with G = 3 or 9, so a query's heads span two tiles), segment lengths, left padding, causal limits, the sliding
window and the split-KV chunks all end inside tiles. The fixed-tile kernels (combine, rotate_keys, map_kv_caches:
``BLOCK_L`` rows) get lengths that straddle their tile too. Without CUDA this runs in the interpreter (small
shapes: about a minute in all); on a GPU the same cases run compiled.
"""
import pytest
import torch

import pskernels
from pskernels import RopeSpec, ref
from pskernels._core.segments import normalize_segments
from pskernels.triton import combine, map_kv_caches, rotate_keys
from pskernels.triton import multi_branch_attention as mba
from pskernels.triton.utils import MODE

from op_helpers import tile_params

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(MODE == "compiled" and not torch.cuda.is_available(), reason="compiled, no GPU")]
DEV = "cuda" if MODE == "compiled" else "cpu"
F32, F16 = torch.float32, torch.float16
ATOL, RTOL = {F32: 1e-4, F16: 4e-3}, {F32: 0.0, F16: 2e-3}
B, HKV, D, DV = 2, 1, 32, 24

# tile class -> (decode: split-KV, RoPE (style, rotary dim D / n) or None, softcap + window + calibration knobs)
CLASS_FEATURES = {
    "plain": (False, None, False),
    "rope": (False, ("neox", 1), False),  # neox over the whole head: the two-halves path
    "rope_any": (False, ("gptj", 1), False),
    "heavy": (False, ("neox", 1), True),
    "heavy_rope_any": (False, ("neox", 2), True),  # partial rotary
    "split": (True, ("neox", 1), False),
    "split_heavy": (True, ("gptj", 1), True),
}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    # library-allocated outputs start as NaN: a missed write fails the comparison
    monkeypatch.setenv("PSKERNELS_DEBUG_NAN", "1")


def _rope(rd, style="neox"):
    return RopeSpec(1.0 / 10000 ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd), style=style)


def _assert_close(a, b, dtype):
    assert not a.isnan().any(), "NaN in triton output"
    torch.testing.assert_close(a.float(), b.float(), atol=ATOL[dtype], rtol=RTOL[dtype])


def _tile_cases():
    """(class, half precision, tile) for every distinct (BLOCK_M, BLOCK_N) of a class on sm_80 or sm_90."""
    # the cascade classes need a shared segment and several batch rows: tests/test_triton_cascade.py covers them
    per_row = {c for c in mba._TILES["half"] if not c.startswith("cascade")}
    assert set(CLASS_FEATURES) == per_row == {c for c in mba._TILES["fp32"] if not c.startswith("cascade")}
    return tile_params(CLASS_FEATURES)


def _attention_case(cls, bm, bn, dtype):
    """q, keys, values and the keyword arguments of a ``cls`` specialisation whose rows and keys straddle tiles."""
    decode, rope, heavy = CLASS_FEATURES[cls]
    # G * Lq query rows: more than one BLOCK_M tile and not a multiple of it (split-KV is for Lq <= 8)
    G = 9 if decode else 3
    Lq = bm // G + 1 if decode else max(mba._DECODE_ROWS + 1, bm // G + 1)
    assert G * Lq > bm and G * Lq % bm and decode == (Lq <= mba._DECODE_ROWS)
    # key ranges ending inside BLOCK_N tiles; the decode prefix is long enough that a GPU splits it too
    n_prefix, n_branch, n_own = (261 if decode else 5) + 2 * bn, bn - 3, Lq + 5
    lens = (n_prefix, n_branch, n_own)
    q = torch.randn(B, G * HKV, Lq, D, dtype=dtype, device=DEV)
    keys = [torch.randn(B, HKV, n, D, dtype=dtype, device=DEV) for n in lens]
    values = [torch.randn(B, HKV, n, DV, dtype=dtype, device=DEV) for n in lens]
    kw = dict(seq_lens=torch.tensor([[n_prefix, n_prefix - bn // 2 - 1], [n_branch, n_branch], [n_own, Lq]]),
              left_pad=torch.tensor([[3, 0], [0, 1], [0, 0]]))
    if rope is not None:
        style, n = rope
        kw.update(rope=_rope(D // n, style),
                  position_shifts=torch.tensor([[0, 0], [n_prefix, n_prefix - 4], [n_prefix + n_branch, 9]]))
    if heavy:
        Hq = G * HKV
        # the window ends inside the prefix, at another slot for each query
        kw.update(softcap=5.0, sliding_window=n_branch + n_own + n_prefix // 2,
                  segment_positions=torch.tensor([0, n_prefix, n_prefix + n_branch]),
                  segment_groups=[0, 1, 1], temperature=torch.rand(2, Hq) + 0.5, lse_scale=torch.rand(2) + 0.5,
                  log_weight=torch.randn(2, Hq))
    return q, keys, values, kw


class _LaunchRecorder:
    """Stands in for the attention kernel: records the keyword arguments (constexprs) of each launch, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches.append(meta)
            return self.kernel[grid](*args, **meta)

        return launch


@pytest.mark.parametrize("cls,half,tile", _tile_cases())
def test_attention_tile(cls, half, tile, monkeypatch):
    dtype = F16 if half else F32
    q, keys, values, kw = _attention_case(cls, tile[0], tile[1], dtype)
    p = normalize_segments(q, keys, values, **kw)
    recorder = _LaunchRecorder(mba._mba_fwd_kernel)
    monkeypatch.setattr(mba, "_mba_fwd_kernel", recorder)
    out, lse = mba.multi_branch_attention(q, keys, values, p, tile=tile)
    (meta,) = recorder.launches  # one launch, of this tile, specialised in this class
    assert mba.tile_class(**meta) == cls and (meta["BLOCK_M"], meta["BLOCK_N"]) == tile[:2]
    ref_out, ref_lse = ref.multi_branch_attention(q, keys, values, p)
    _assert_close(out, ref_out, dtype)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse)), "-inf pattern of lse differs"
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin].float(), atol=1e-4 if dtype == F32 else 2e-2, rtol=0)


def test_merge_states_tile():
    L = 2 * combine.BLOCK_L + 5
    o, s = torch.randn(3, B, 2, L, 80, device=DEV), torch.randn(3, B, 2, L, device=DEV) * 3
    s[0, 0, 0, L - 3:] = float("-inf")
    out, lse = pskernels.merge_states(o, s, backend="triton")
    ref_out, ref_lse = pskernels.merge_states(o, s, backend="torch")
    _assert_close(out, ref_out, F32)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)


@pytest.mark.parametrize("style,rd", [("neox", 80), ("gptj", 32)])
def test_rotate_keys_tile(style, rd):
    L = 2 * rotate_keys.BLOCK_L + 5
    k = torch.randn(B, L + 3, 2, 80, device=DEV).transpose(1, 2)[:, :, 1 : L + 1]
    delta = torch.randint(-500, 500, (B, L), device=DEV)
    spec = _rope(rd, style)
    _assert_close(pskernels.rotate_keys(k, delta, spec, backend="triton"),
                  pskernels.rotate_keys(k, delta, spec, backend="torch"), F32)


def test_map_kv_caches_tile():
    NL, H, r, n = 2, 2, 4, map_kv_caches.BLOCK_L
    lens = [[2 * n + 5, 3], [n + 1, 0]]
    keys = [[torch.randn(B, H, m, D, device=DEV) for m in row] for row in lens]
    values = [[torch.randn(B, H, m, DV, device=DEV) for m in row] for row in lens]
    kw = dict(rope=_rope(D), orig_positions=torch.randint(0, 50, (NL, 2, B)),
              new_positions=torch.randint(0, 500, (NL, 2, B)),
              k_down=torch.randn(NL, H, D, r) * 0.1, k_up=torch.randn(NL, H, r, D) * 0.1, k_gate=torch.randn(NL, H),
              v_down=torch.randn(NL, H, DV, r) * 0.1, v_up=torch.randn(NL, H, r, DV) * 0.1)
    kw = {k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    got, want = (pskernels.map_kv_caches(keys, values, backend=b, **kw) for b in ("triton", "torch"))
    for side_got, side_want in zip(got, want):
        for row_got, row_want in zip(side_got, side_want):
            for x, y in zip(row_got, row_want):
                _assert_close(x, y, F32)
