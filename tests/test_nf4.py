"""QLoRA's NF4: the levels, quantization to the nearest level, packing, the nf4_matmul op, and a
LoRA update trained over an NF4 base."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import graphlora as gl
from graphlora.lora.nf4 import NF4_LEVELS, NF4Weight, nf4_matmul, normal_float_levels
from graphlora.optim import SGD

weights = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=9),
    elements=st.floats(-4, 4, allow_subnormal=False),
)


def test_the_published_levels_are_the_normal_quantiles_of_the_paper() -> None:
    derived = normal_float_levels()
    assert derived.shape == (16,)
    np.testing.assert_allclose(derived, NF4_LEVELS, rtol=0, atol=1e-6)
    assert NF4_LEVELS[0] == -1.0 and NF4_LEVELS[7] == 0.0 and NF4_LEVELS[15] == 1.0
    assert np.all(np.diff(NF4_LEVELS) > 0)
    for offset in (0.5, 1.0, 1.2):
        with pytest.raises(
            ValueError, match=re.escape(f"offset must be in (0.5, 1), got {offset}")
        ):
            normal_float_levels(offset)


@given(w=weights, block_size=st.sampled_from([2, 4, 6, 64]))
def test_every_value_gets_its_nearest_level_and_its_block_absmax(
    w: np.ndarray, block_size: int
) -> None:
    q = NF4Weight.quantize(w, block_size=block_size)
    blocks = -(-w.size // block_size)
    assert q.codes.shape == (blocks, block_size // 2) and q.codes.dtype == np.uint8
    assert q.absmax.shape == (blocks,) and q.absmax.dtype == np.float32
    assert q.nbytes == blocks * (block_size // 2) + 4 * blocks
    flat = np.zeros(blocks * block_size, dtype=np.float32)
    flat[: w.size] = w.ravel()
    grouped = flat.reshape(blocks, block_size)
    np.testing.assert_array_equal(q.absmax, np.abs(grouped).max(axis=1) if blocks else [])
    scale = np.where(q.absmax > 0, q.absmax, 1.0)[:, None]
    distance = np.abs(grouped[..., None] / scale[..., None] - NF4_LEVELS)  # (blocks, size, 16)
    indices = q.level_indices()
    chosen = np.take_along_axis(distance, indices[..., None].astype(np.intp), axis=-1)[..., 0]
    np.testing.assert_allclose(chosen, distance.min(axis=-1), rtol=0, atol=1e-6)
    back = q.dequantize(np.float64)
    assert back.shape == w.shape and back.dtype == np.float64
    np.testing.assert_allclose(
        back.ravel(), (NF4_LEVELS[indices] * q.absmax[:, None]).ravel()[: w.size], rtol=1e-6
    )


def test_values_on_the_levels_come_back_exactly_and_ties_take_the_lower_level() -> None:
    on_levels = np.concatenate([NF4_LEVELS, NF4_LEVELS[::-1]]) * 0.5  # absmax 0.5
    q = NF4Weight.quantize(on_levels.astype(np.float32), block_size=32)
    np.testing.assert_array_equal(q.dequantize(), on_levels.astype(np.float32))
    between = (NF4_LEVELS[8] + NF4_LEVELS[9]) / 2  # exactly halfway between two levels
    tie = NF4Weight.quantize(np.array([between, 1.0], dtype=np.float32), block_size=2)
    assert list(tie.level_indices()[0]) == [8, 15]
    zeros = NF4Weight.quantize(np.zeros((3, 5)), block_size=4)  # absmax 0: zeros come back
    np.testing.assert_array_equal(zeros.dequantize(), np.zeros((3, 5)))
    assert list(NF4Weight.quantize(np.array([-1.0, 1.0]), 2).codes) == [0x0F]  # first one high


def test_bad_weights_and_block_sizes_are_refused_with_their_values() -> None:
    cases = [
        (np.array([1.0, np.nan]), 64, ValueError, "NF4Weight.quantize: weight holds NaN or Inf"),
        (np.ones(4), 3, ValueError, "block_size must be even (two codes a byte) and at most "),
        (np.ones(3), 2**28, ValueError, "and at most 4096, got 268435456"),
        (np.ones(4), 0, ValueError, "block_size must be >= 1, got 0"),
        (np.array([1e39, 1.0]), 2, ValueError, "weight holds values up to 1e+39, beyond float32"),
        (np.ones(4, dtype=np.int64), 64, TypeError, "weight must hold floating-point data"),
    ]
    for w, size, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            NF4Weight.quantize(w, block_size=size)


def test_a_hand_made_nf4_weight_whose_parts_do_not_fit_is_refused_by_name() -> None:
    good = NF4Weight.quantize(np.arange(10.0).reshape(2, 5), block_size=4)  # 3 blocks
    assert good.codes.shape == (3, 2) and good.absmax.shape == (3,)
    codes, absmax = good.codes, good.absmax
    cases = [
        (codes[:2], absmax, gl.ShapeError, "needs codes (3, 2) and absmax (3,), got (2, 2) and"),
        (
            codes,
            absmax[:2],
            gl.ShapeError,
            "needs codes (3, 2) and absmax (3,), got (3, 2) and (2,)",
        ),
        (codes.astype(np.int64), absmax, TypeError, "codes must be a uint8 array"),
        (codes, absmax.astype(np.float64), TypeError, "absmax must be a float32 array"),
        (codes, np.full(3, np.inf, np.float32), ValueError, "absmax must hold finite values >= 0"),
        (codes, -absmax, ValueError, "absmax must hold finite values >= 0"),
    ]
    for c, a, error, message in cases:
        with pytest.raises(error, match="^NF4Weight: .*" + re.escape(message)):
            NF4Weight(c, a, (2, 5), 4)
    with pytest.raises(TypeError, match=re.escape("NF4Weight: shape must be a tuple of ints")):
        NF4Weight(codes, absmax, [2, 5], 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape("NF4Weight: block_size must be even")):
        NF4Weight(codes, absmax, (2, 5), 5)
    np.testing.assert_array_equal(
        NF4Weight(codes, absmax, (2, 5), 4).dequantize(), good.dequantize()
    )
    for shape in [(2, -5), (True, 10), (2.0, 5)]:
        message = f"NF4Weight: shape must be a tuple of ints >= 0, got {shape!r}"
        with pytest.raises(TypeError, match=re.escape(message)):
            NF4Weight(codes, absmax, shape, 4)  # type: ignore[arg-type]
    empty = NF4Weight.quantize(np.zeros((0, 3)), block_size=4)  # no blocks at all: allowed
    assert empty.codes.shape == (0, 2) and empty.dequantize().shape == (0, 3)
    assert NF4Weight.quantize(np.zeros(8), block_size=4096).absmax.tolist() == [0.0]  # the largest
    with pytest.raises(ValueError, match="at most 4096, got 4098"):
        NF4Weight.quantize(np.zeros(8), block_size=4098)


def test_nf4_matmul_is_x_times_the_dequantized_weight_and_refuses_what_does_not_fit() -> None:
    rng = np.random.default_rng(0)
    q = NF4Weight.quantize(rng.normal(size=(6, 4)))
    g = gl.Graph()
    x = g.parameter(rng.normal(size=(2, 3, 6)))
    y = g.apply(nf4_matmul, x, weight=q)
    np.testing.assert_array_equal(g.value(y), g.value(x) @ q.dequantize(np.float64))
    g.backward(g.sum(y))
    np.testing.assert_allclose(g.grad(x), np.ones((2, 3, 4)) @ q.dequantize(np.float64).T)
    ops_before = len(g)
    with pytest.raises(gl.ShapeError, match=re.escape("nf4_matmul: x (2, 3, 6) needs a weight")):
        g.apply(nf4_matmul, x, weight=NF4Weight.quantize(np.ones((5, 4))))
    with pytest.raises(TypeError, match="nf4_matmul: weight must be an NF4Weight, got ndarray"):
        g.apply(nf4_matmul, x, weight=np.ones((6, 4)))
    assert len(g) == ops_before  # nothing recorded


def test_a_lora_update_trains_over_a_frozen_nf4_base_and_replays_bit_for_bit() -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.02, size=(16, 8))
    q = NF4Weight.quantize(w)
    x_data, target = rng.normal(size=(32, 16)), rng.normal(size=(32, 8))

    def trained(replay: bool) -> tuple[list[float], np.ndarray, np.ndarray]:
        g = gl.Graph()
        a = g.parameter(rng_a.normal(0, 0.1, size=(16, 4)), "A")
        b = g.parameter(np.zeros((4, 8)), "B")
        x, t = g.constant(x_data), g.constant(target)
        opt = SGD(g, [a, b], lr=0.5)

        def loss() -> gl.NodeId:
            base = g.apply(nf4_matmul, x, weight=q)
            return g.mse_loss(g.add(base, g.matmul(g.scale(g.matmul(x, a), 2.0), b)), t)

        losses = []
        step = g.compile(loss()) if replay else None
        for _ in range(20):
            if step is not None:
                losses.append(float(step()))
            else:
                out = loss()
                losses.append(float(g.value(out)))
                g.backward(out)
            opt.step()
            opt.zero_grad()
            if step is None:
                g.reset()
        return losses, np.array(g.value(a)), np.array(g.value(b))

    rng_a = np.random.default_rng(2)
    recorded = trained(replay=False)
    rng_a = np.random.default_rng(2)
    replayed = trained(replay=True)
    assert recorded[0][-1] < recorded[0][0]  # the adapter learns around the frozen base
    for got, want in zip(replayed, recorded, strict=True):
        np.testing.assert_array_equal(got, want)
