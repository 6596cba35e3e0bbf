"""Checking an exercise file: its gradients against finite differences (AdamW: against the reference), over
shapes that hypothesis draws.

The edge cases come first (batch 1, time 1, one head of size 1; then no biases; then odd widths; then
dropout on), and the drawn examples after them are the same on every run (derandomize). A failure at
the first edge case, the smallest shape there is, is shown at once. Any other failure is shrunk by
hypothesis, for a few seconds at most, and the smallest failure seen is the one shown. The result is
kept in DIR/.status.json under the file's sha256, so a file is checked again only once it has changed.
"""

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy

import minillm.layers
import minillm.model
import minillm.optim
from minillm.exercises import modules
from minillm.exercises.catalog import DEFAULT_DIR, PROG, ExerciseError
from minillm.exercises.source import BLANK_PREFIX
from minillm.testing import TOLERANCE, cases, compare
from minillm.testing.check import parameter_names

STATUS_FILE = ".status.json"
STATUSES = ("passed", "failing")
# Drawn examples after the edge cases, per kind of exercise: a block's check costs ten layers'.
EXAMPLES = {"layer": 40, "block": 15, "adamw": 40}
# A failing check costs more than a passing one (finite differences at every step size), and each
# shrinking step is a check: past this, the smallest failure found so far is the one shown.
SHRINK_SECONDS = 4.0
ADAMW_STEPS = 3
DROPOUT = 0.25
# Smallest first: each one that passes makes the next a little harder.
LAYER_EDGES = [
    dict(sizes=cases.Sizes(batch=1, time=1, n_head=1, head_size=1, vocab=2), seed=0, dropout_p=0.0),
    dict(sizes=cases.Sizes(batch=1, time=1, n_head=1, head_size=1, vocab=2, bias=False), seed=1, dropout_p=0.0),
    dict(sizes=cases.Sizes(batch=1, time=2, n_head=1, head_size=3, vocab=3), seed=2, dropout_p=0.0),
    dict(sizes=cases.Sizes(batch=2, time=3, n_head=3, head_size=1, vocab=5), seed=3, dropout_p=DROPOUT),
]
ADAMW_EDGES = [
    dict(shape=(1,), lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, seed=0),
    dict(shape=(2, 3), lr=0.1, beta1=0.5, beta2=0.9, eps=1e-3, weight_decay=0.0, seed=1),
]


@dataclass
class Outcome:
    """What a check found: `passed`, the lines to print, and a few words for a status ("dw wrong")."""

    passed: bool
    lines: list
    reason: str = ""

    @property
    def status(self):
        return "passed" if self.passed else "failing"


class Failed(Exception):
    """Raised inside the hypothesis test at a failing example, so that hypothesis shrinks it."""


class Enough(BaseException):
    """Ends the search for a smaller failure once SHRINK_SECONDS have passed since the first one. A
    BaseException, as KeyboardInterrupt is: hypothesis lets those through at once, where it would take
    an Exception for another failure to shrink."""


def hypothesis_or_error():
    """hypothesis, its strategies and minillm.testing.strategies; a one-line usage error where it is missing."""
    try:
        import hypothesis
        from hypothesis import strategies

        from minillm.testing import strategies as ours
    except ImportError:
        raise ExerciseError("checking needs hypothesis: pip install -e \".[exercises]\" (or \".[test]\")",
                            status=2) from None
    return hypothesis, strategies, ours


def shapes_text(arrays):
    """'x 1x1x3, w 3, b 3' of named arrays (no entry for an absent one)."""
    return ", ".join(f"{name} {'x'.join(map(str, numpy.shape(a))) or 'scalar'}"
                     for name, a in arrays if a is not None)


def size_of(arrays):
    return sum(numpy.size(a) for _, a in arrays if a is not None)


def named_inputs(case):
    return list(zip(case.names or parameter_names(case.forward, len(case.inputs)), case.inputs))


def run_examples(exercise, module, shown, make, strategies_of, edges, explain):
    """Check the examples make(**example) gives, the edge cases first; the Outcome.

    make returns (arrays, run): the named inputs (for the shapes) and run(), which runs the learner's code
    and returns a GradientReport. explain(example) says in words where it failed, beyond the shapes.
    The first edge case is the smallest shape there is: a failure there is the one shown. A failure at
    a later edge case is kept while hypothesis looks for a smaller one, which it then shrinks; the
    smallest failure seen is the one shown.
    """
    hypothesis, st, ours = hypothesis_or_error()
    passed, failures = [], []

    def body(edge, **example):
        if failures and time.monotonic() > failures[0][0] + SHRINK_SECONDS:
            raise Enough()
        arrays, run = make(**example)
        try:
            found = run()
        except Exception as err:  # the learner's code: any exception is theirs to see
            found = err
        if isinstance(found, Exception) or not found.ok:
            failures.append((time.monotonic(), size_of(arrays), example, arrays, found))
            if edge != "later":
                raise Failed()
        else:
            passed.append(arrays)

    test = hypothesis.given(edge=st.just("drawn"), **strategies_of(st, ours))(body)
    for i, example in reversed(list(enumerate(edges))):
        test = hypothesis.example(edge="later" if i else "first", **example)(test)
    test = hypothesis.settings(
        derandomize=True, database=None, deadline=None, max_examples=EXAMPLES[exercise.kind],
        report_multiple_bugs=False, verbosity=hypothesis.Verbosity.quiet,
        suppress_health_check=list(hypothesis.HealthCheck),
    )(test)
    try:
        test()
    except (Failed, Enough):
        pass
    except hypothesis.errors.HypothesisException:  # Flaky: a learner's code that does not fail every time
        if not failures:
            raise
    if not failures:
        distinct = {shapes_text(arrays): size_of(arrays) for arrays in passed}
        smallest, largest = min(distinct, key=distinct.get), max(distinct, key=distinct.get)
        against = "the reference" if exercise.kind == "adamw" else "the finite differences (float64)"
        return Outcome(True, [f"{shown}: passed: {len(distinct)} shapes, from {smallest} to {largest}",
                              f"every {'array' if exercise.kind == 'adamw' else 'gradient'} exact or within "
                              f"{TOLERANCE:g} of {against}"])
    _, _, example, arrays, found = min(failures, key=lambda failure: failure[1])
    where = f"{shapes_text(arrays)}, {explain(example)}"
    if isinstance(found, Exception):
        return exception_outcome(exercise, module, shown, found, where)
    wrong = [row.name for row in found.failing] or ["the gradients"]
    return Outcome(False, [f"{shown}: failed at {where}:", str(found), f"stuck? {PROG} hint {exercise.name}"],
                   f"{', '.join(wrong)} wrong")


def exception_outcome(exercise, module, shown, err, where):
    if isinstance(err, NotImplementedError) and str(err).startswith(BLANK_PREFIX):
        function = {"layer": "backward", "block": "block_backward"}.get(exercise.kind, "adamw_update")
        return Outcome(False, [f"{shown}: {function} is not written yet: replace its raise NotImplementedError "
                               f"with your code (stuck? {PROG} hint {exercise.name})"], "not written yet")
    error = modules.learner_error(err, module, shown, f"at {where}")
    return Outcome(False, error.lines, error.reason)


def check_layer_file(exercise, module, shown):
    def make(sizes, seed, dropout_p):
        case = cases.layer_case(exercise.name, module, sizes, seed, dropout_p=dropout_p)
        return named_inputs(case), lambda: case.check(seed=seed)

    return run_examples(exercise, module, shown, make, sizes_and_seeds, LAYER_EDGES, dropout_text)


def check_block_file(exercise, module, shown):
    def make(sizes, seed, dropout_p):
        case = cases.block_case(minillm.model.block_forward, module.block_backward, minillm.layers, sizes, seed,
                                dropout_p=dropout_p)
        return named_inputs(case)[:1], lambda: case.check(seed=seed)

    return run_examples(exercise, module, shown, make, sizes_and_seeds, LAYER_EDGES, dropout_text)


def sizes_and_seeds(st, ours):
    return dict(sizes=ours.sizes(), seed=st.integers(0, 2**16), dropout_p=st.sampled_from([0.0, DROPOUT]))


def dropout_text(example):
    return f"seed {example['seed']}" + (f", dropout {example['dropout_p']}" if example["dropout_p"] else "")


def check_adamw_file(exercise, module, shown):
    def make(shape, lr, beta1, beta2, eps, weight_decay, seed):
        rng = numpy.random.default_rng(seed)
        start = rng.normal(size=shape)
        gradients = [rng.normal(size=shape) for _ in range(ADAMW_STEPS)]

        def run():
            """Both updates from the same p, with m = v = 0 and the same gradients, step by step from t = 1."""
            theirs, ours = ([start.copy(), numpy.zeros(shape), numpy.zeros(shape)] for _ in range(2))
            for t, g in enumerate(gradients, 1):
                before = [a.copy() for a in theirs]
                hyper = (lr, t, beta1, beta2, eps, weight_decay)
                module.adamw_update(theirs[0], g.copy(), theirs[1], theirs[2], *hyper)
                minillm.optim.adamw_update(ours[0], g.copy(), ours[1], ours[2], *hyper)
                report = compare(dict(zip("pmv", theirs)), dict(zip("pmv", ours)),
                                 title=f"adamw_update at step t={t} (p, m, v after it, against minillm.optim's)")
                if not report.ok:
                    report.notes += [f"{name} is what it was before the step: update it in place ({name}[...] = "
                                     f"..., not {name} = ...)" for name, a, b in zip("pmv", theirs, before)
                                     if numpy.array_equal(a, b)]
                    break
            return report

        return [("p", start)], run

    def strategies(st, ours):
        return dict(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
                    lr=st.floats(1e-4, 0.5), beta1=st.floats(0.0, 0.99), beta2=st.floats(0.5, 0.999),
                    eps=st.sampled_from([1e-8, 1e-6, 1e-3]), weight_decay=st.sampled_from([0.0, 0.01, 0.1]),
                    seed=st.integers(0, 2**16))

    def explain(example):
        return ", ".join(f"{key} {example[key]:g}" for key in ("lr", "beta1", "beta2", "eps", "weight_decay"))

    return run_examples(exercise, module, shown, make, strategies, ADAMW_EDGES, explain)


CHECKS = {"layer": check_layer_file, "block": check_block_file, "adamw": check_adamw_file}
# What each kind of exercise file must define for its check (and for train.py --layers-from).
FUNCTIONS = {"layer": ("forward", "backward"), "block": ("block_backward",), "adamw": ("adamw_update",)}


def check(exercise, directory):
    """Check DIR/NAME.py now; the Outcome (an ExerciseError when the file is not there)."""
    path = exercise.path(directory)
    shown = str(path)
    hypothesis_or_error()
    try:
        module = modules.load(path, shown)
    except modules.LearnerError as err:
        return Outcome(False, err.lines, err.reason)
    missing = [name for name in FUNCTIONS[exercise.kind] if not callable(getattr(module, name, None))]
    if missing:
        return Outcome(False, [f"{shown}: there is no function {' or '.join(missing)}: {PROG} start "
                               f"{exercise.name} --force writes the exercise afresh"], f"no {missing[0]}")
    return CHECKS[exercise.kind](exercise, module, shown)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_statuses(directory):
    try:
        saved = json.loads((Path(directory) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def record(exercise, directory, outcome, sha):
    """Keep the outcome in DIR/.status.json under the file's sha256."""
    path = Path(directory) / STATUS_FILE
    saved = read_statuses(directory)
    saved[exercise.name] = {"sha256": sha, "status": outcome.status, "reason": outcome.reason}
    # Several processes (the ranks of one training job) may check the same folder at once.
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except OSError:
        pass  # a folder that cannot be written to only costs checking again next time


def checked(exercise, directory):
    """check(), recorded in the status file; an ExerciseError naming `start` when the file is not there."""
    path = exercise.path(directory)
    if not path.is_file():
        raise ExerciseError(f"{path} is not there: {PROG} start {exercise.name}"
                            + ("" if Path(directory) == Path(DEFAULT_DIR) else f" --dir {directory}")
                            + " writes it")
    sha = digest(path)
    outcome = check(exercise, directory)
    record(exercise, directory, outcome, sha)
    return outcome


def status(exercise, directory):
    """("not started" | "failing" | "passed", reason): from the status file when it holds this very file,
    else by checking it now."""
    path = exercise.path(directory)
    if not path.is_file():
        return "not started", ""
    saved = read_statuses(directory).get(exercise.name)
    if isinstance(saved, dict) and saved.get("sha256") == digest(path) and saved.get("status") in STATUSES:
        return saved["status"], saved.get("reason", "")
    outcome = checked(exercise, directory)
    return outcome.status, outcome.reason
