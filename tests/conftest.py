"""Shared fixtures: the `xp_device` parametrisation over the CPU and a CUDA GPU, a small corpus, and the
hypothesis profile.

`xp_device` runs a test once per backend, "cpu" (NumPy) and "cuda" (CuPy); the
CUDA case is skipped unless CuPy is installed and sees a GPU. The hypothesis
profile turns off the per-example deadline (finite differences are slow but not
flaky) and keeps the default number of examples small; tests that are costlier
per example ask for fewer. HYPOTHESIS_PROFILE=stress runs many more examples
where a test does not fix its own count.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

from minillm import backend, data

settings.register_profile(
    "minillm", deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("stress", settings.get_profile("minillm"), max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "minillm"))


@pytest.fixture(params=["cpu", "cuda"])
def xp_device(request):
    """A concrete device name; "cuda" only where CuPy and a GPU are present."""
    if request.param == "cuda" and not backend.cuda_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    return request.param


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text file of the built-in corpus: training on it takes well under a second."""
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(data.builtin_corpus()[:20_000])
    return path
