"""Built-in fine-tuning tasks, generated in the package (nothing is downloaded).

addition   prompt "123+045=", completion "168": the sum of two numbers of two or
           three digits (10 to 999), written with three digits each so that units
           sit under units (without that, a small model spends most of its training
           learning to align the digits). The 990 * 990 = 980,100 problems are
           shuffled once with a fixed seed and cut into disjoint sets:
               test    the first 1,000: held out, never in the training set
               train   the next 20,000 (training keeps its last 10% for the validation loss)
           So an exact-match score on `test` measures problems the model has never seen.
"""

import numpy

ADDITION_RANGE = (10, 1000)  # operands from 10 to 999
ADDITION_SIZES = {"test": 1_000, "train": 20_000}
TASKS = ("addition",)


def addition(split):
    """[(prompt, completion)] of one split ("train" or "test") of the addition task."""
    low, high = ADDITION_RANGE
    width = high - low
    order = numpy.random.default_rng(0).permutation(width * width)
    start = 0 if split == "test" else ADDITION_SIZES["test"]
    chosen = order[start : start + ADDITION_SIZES[split]]
    return [(f"{a:03d}+{b:03d}=", str(a + b)) for a, b in zip(chosen // width + low, chosen % width + low)]


def examples(name, split):
    """[(prompt, completion)] of the named task's split."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return addition(split)
