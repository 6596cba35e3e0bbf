"""Hypothesis strategies for gradient checks: sizes with the edge cases, and well-conditioned float64 inputs.

    from hypothesis import given
    from minillm.testing import check_layer, strategies

    @given(strategies.inputs(lambda s: [(s.batch, s.time, s.width), (s.width,)]))
    def test_rmsnorm(inputs):
        check_layer(rmsnorm_forward, rmsnorm_backward, inputs).assert_ok()

sizes() draws batch 1..3, time 1..5, heads 1..3 of size 1..3 (so widths 1 to 9, odd ones
included) and a vocabulary 2..7; each shrinks towards 1, so a failure is reported at the
smallest shape that shows it. Array values come from a normal generator seeded by a drawn
seed and are clipped to +-4 standard deviations: hypothesis's own float strategy favours
zeros and ties, and there a layer with a kink or a max (ReLU, a max over equal values, a
LayerNorm of equal features) has no gradient that a finite difference can find.
"""

import numpy

try:
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - depends on the installation
    raise ImportError("minillm.testing.strategies needs hypothesis: pip install 'minillm[test]' "
                      "(or pip install hypothesis)") from None

from minillm.testing.cases import Sizes

CLIP = 4.0


def seeds():
    return st.integers(0, 2**32 - 1)


def sizes(max_batch=3, max_time=5, max_heads=3, max_head_size=3, max_vocab=7, bias=None):
    """Sizes(batch, time, n_head, head_size, vocab, bias); bias drawn unless given."""
    return st.builds(
        Sizes, batch=st.integers(1, max_batch), time=st.integers(1, max_time), n_head=st.integers(1, max_heads),
        head_size=st.integers(1, max_head_size), vocab=st.integers(2, max_vocab),
        bias=st.booleans() if bias is None else st.just(bias),
    )


def normal(shape, seed, scale=1.0):
    """A float64 array of N(0, scale^2) values clipped to +-CLIP scale, from a generator seeded with `seed`."""
    return numpy.clip(numpy.random.default_rng(seed).normal(size=shape), -CLIP, CLIP) * scale


def arrays(shape, scale=1.0):
    """float64 arrays of this shape (see normal)."""
    return seeds().map(lambda seed: normal(shape, seed, scale))


def inputs(shapes_of, sizes_drawn=None, scale=1.0):
    """Tuples of float64 arrays, one per shape that shapes_of(Sizes) returns, all from one drawn seed.

    sizes_drawn: the strategy of the Sizes (default: sizes()).
    """
    def arrays_for(drawn):
        shapes = shapes_of(drawn)
        return seeds().map(lambda seed: tuple(normal(shape, seed + i, scale) for i, shape in enumerate(shapes)))

    return (sizes_drawn or sizes()).flatmap(arrays_for)
