"""python -m minillm.exercises: the files it writes, the checks it runs, the hints it gives, and the layer set
train.py --layers-from loads.

- The solutions (each reference source written as the learner's file) pass their check; each of
  several mistakes a learner makes, written as a small edit of the reference's backward, fails it
  (exit status 1) and the output names the wrong gradient as WRONG.
- The report says what a familiar mistake looks like (a factor, a transpose), at the smallest shape.
- `start` keeps the reference's forward (the same outputs) and withholds the backward equations, and
  never overwrites a file without --force.
- A learner's syntax error is one line with the file and line; an exception shows their frames only.
- learner_layers uses only what passes, and the composite layers call the learner's simple ones.
The checks run in this process (main(argv), output from capsys); one test runs the module itself.
"""

import ast
import inspect
import json
import re
import subprocess
import sys

import numpy
import pytest

import minillm.layers
import minillm.model
import minillm.optim
from minillm.exercises import ExerciseError, catalog, checking, learner_layers, source
from minillm.exercises.commands import main

NAMES = catalog.NAMES


def solution(name):
    """The reference as a learner's finished file."""
    exercise = catalog.BY_NAME[name]
    if exercise.kind == "layer":
        return exercise.reference.read_text()
    if exercise.kind == "block":
        return "\n\n".join(inspect.getsource(f) for f in (minillm.model.block_forward, minillm.model.block_backward))
    return "from minillm.backend import get_array_module\n\n\n" + inspect.getsource(minillm.optim.adamw_update)


def write(directory, name, text):
    directory.mkdir(exist_ok=True)
    (directory / f"{name}.py").write_text(text)


def edited(name, *edits):
    """The solution with each (old, new) replaced; old must occur exactly once."""
    text = solution(name)
    for old, new in edits:
        assert text.count(old) == 1, (name, old)
        text = text.replace(old, new)
    return text


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def wrong_rows(out):
    return {line.split()[0] for line in out.splitlines() if re.match(r"^\S+\s+\S+\s+.*\sWRONG$", line)}


@pytest.mark.parametrize("name", NAMES)
def test_the_reference_written_as_the_learners_file_passes(tmp_path, capsys, name):
    write(tmp_path, name, solution(name))
    status, out, err = run(capsys, "check", name, "--dir", str(tmp_path))
    assert status == 0, out + err
    assert out.startswith(f"{tmp_path / name}.py: passed: ") and " shapes, from " in out, out


TRANSPOSED_DW = ("x.reshape(-1, n_in).T @ dout.reshape(-1, n_out)", "dout.reshape(-1, n_out).T @ x.reshape(-1, n_in)")
MEAN_DB = ("dout.reshape(-1, n_out).sum(axis=0)", "dout.reshape(-1, n_out).mean(axis=0)")
# (exercise, edits of the reference, the inputs whose gradient must be reported WRONG)
MISTAKES = [
    # linear: the weight gradient transposed; the bias gradient not summed over batch and time, or averaged
    ("linear", [TRANSPOSED_DW], {"w"}),
    ("linear", [("dout.reshape(-1, n_out).sum(axis=0) if", "dout if")], {"b"}),
    ("linear", [MEAN_DB], {"b"}),
    # gelu: the derivative of x^3 without its 3; tanh' as 1 - t; the product rule's first term left out
    ("gelu", [("K * (1.0 + 3.0 * A * x ** 2)", "K * (1.0 + A * x ** 2)")], {"x"}),
    ("gelu", [("dt_du = 1.0 - t ** 2", "dt_du = 1.0 - t")], {"x"}),
    ("gelu", [("dout * (0.5 * (1.0 + t) + 0.5 * x * dt_du * du_dx)", "dout * 0.5 * x * dt_du * du_dx")], {"x"}),
    # softmax: without the row sum; without the factor p; the sum over the wrong axis
    ("softmax", [("p * (dp - (dp * p).sum(axis=-1, keepdims=True))", "p * dp")], {"s"}),
    ("softmax", [("p * (dp - (dp * p).sum(axis=-1, keepdims=True))", "dp - (dp * p).sum(axis=-1, keepdims=True)")],
     {"s"}),
    ("softmax", [("(dp * p).sum(axis=-1, keepdims=True)", "(dp * p).sum(axis=0, keepdims=True)")], {"s"}),
    # layernorm: dx without the variance path, or without the mean path; dw not summed over rows; dxhat without w
    ("layernorm", [("                 - dxhat.mean(axis=-1, keepdims=True)       # through mu,\n"
                    "                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))",
                    "                 - dxhat.mean(axis=-1, keepdims=True))")], {"x"}),
    ("layernorm", [("                 - dxhat.mean(axis=-1, keepdims=True)       # through mu,\n", "")], {"x"}),
    ("layernorm", [("dw = (dout * xhat).sum(axis=rows)", "dw = dout * xhat")], {"w"}),
    ("layernorm", [("dxhat = dout * w ", "dxhat = dout ")], {"x"}),
    # cross-entropy: without the 1/n_counted; ignored rows not zeroed; the sign flipped
    ("cross_entropy", [("weight * (dloss / n_counted)", "weight * dloss")], {"logits"}),
    ("cross_entropy", [("weight * (dloss / n_counted)", "xp.ones_like(weight) * (dloss / n_counted)")], {"logits"}),
    ("cross_entropy", [("(p - onehot)", "(onehot - p)")], {"logits"}),
    # embedding: dwte[idx] += dout instead of the scatter-add; dwpe averaged over the batch, or left out
    ("embedding", [("xp.add.at(dwte, idx.reshape(-1), dout.reshape(-1, C))", "dwte[idx] += dout")], {"wte"}),
    ("embedding", [("dwpe[: idx.shape[1]] = dout.sum(axis=0)", "dwpe[: idx.shape[1]] = dout.mean(axis=0)")], {"wpe"}),
    ("embedding", [("    dwpe[: idx.shape[1]] = dout.sum(axis=0)", "")], {"wpe"}),
    # mlp: GELU's backward skipped; the gradients returned in the wrong order; a weight gradient not formed
    ("mlp", [("dh = gelu.backward(dg, gelu_cache)", "dh = dg")], {"x", "w_fc"}),
    ("mlp", [("return dx, dw_fc, db_fc, dw_proj, db_proj", "return dx, dw_proj, db_proj, dw_fc, db_fc")],
     {"w_fc", "w_proj"}),
    ("mlp", [("linear.backward(dout, proj_cache, weight_grads)", "linear.backward(dout, proj_cache, False)")],
     {"w_proj"}),
    # attention: dq without 1/sqrt(hs); the dropout's backward skipped; dv without the transpose; no softmax backward
    ("attention", [("dq = dS @ k / math.sqrt(hs)", "dq = dS @ k")], {"w_attn"}),
    ("attention", [("dP = dropout.backward(dPd, dropout_cache)", "dP = dPd")], {"w_attn"}),
    ("attention", [("dv = Pd.transpose(0, 1, 3, 2) @ dY", "dv = Pd @ dY")], {"w_attn"}),
    ("attention", [("dS = softmax.backward(dP, softmax_cache)", "dS = dP")], {"x", "w_attn"}),
    # block: the residual's gradient not added; the MLP branch's dropout skipped; a LayerNorm's gradients misfiled
    ("block", [("    dx = dx + dh\n\n    # x_mid", "    dx = dh\n\n    # x_mid")], {"x"}),
    ("block", [("dm = layers.dropout.backward(dx, drop_mlp)", "dm = dx")], {"mlp.c_fc.weight"}),
    ("block", [('names("ln_2.weight", "ln_2.bias")', 'names("ln_1.weight", "ln_1.bias")')], {"ln_2.weight"}),
    # adamw: the bias correction left out; the decay without lr; m not updated in place
    ("adamw", [("m_hat = m / (1.0 - beta1**t)", "m_hat = m"), ("v_hat = v / (1.0 - beta2**t)", "v_hat = v")],
     {"p"}),
    ("adamw", [("p[...] = p - lr * weight_decay * p", "p[...] = p - weight_decay * p")], {"p"}),
    ("adamw", [("m[...] = beta1 * m + (1.0 - beta1) * g", "m = beta1 * m + (1.0 - beta1) * g")], {"m"}),
]


def test_every_exercise_has_three_mistakes():
    assert all(sum(name == mistake[0] for mistake in MISTAKES) >= 3 for name in NAMES)


@pytest.fixture(autouse=True)
def quick_shrinking(monkeypatch):
    """A second of shrinking finds the smallest failures these tests look for, and keeps the file fast."""
    monkeypatch.setattr(checking, "SHRINK_SECONDS", 1.0)


@pytest.mark.parametrize("name, edits, wrong", MISTAKES, ids=[f"{name}-{i}" for i, (name, *_) in enumerate(MISTAKES)])
def test_a_mistake_fails_the_check_and_is_named(tmp_path, capsys, name, edits, wrong):
    write(tmp_path, name, edited(name, *edits))
    status, out, err = run(capsys, "check", name, "--dir", str(tmp_path))
    assert status == 1, out + err
    assert f"{tmp_path / name}.py: failed at " in out and "FAILED" in out, out
    assert wrong <= wrong_rows(out), out


def test_the_report_recognises_a_factor_and_a_transpose(tmp_path, capsys):
    write(tmp_path, "linear", edited("linear", ("dx = dout @ w.T", "dx = 2 * (dout @ w.T)")))
    write(tmp_path, "softmax", edited("softmax", ("    return ds", "    return ds / 2")))
    assert main(["check", "linear", "--dir", str(tmp_path)]) == 1
    assert main(["check", "softmax", "--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "it is 2x the right answer" in out and "it is 1/2 of the right answer" in out, out

    write(tmp_path, "linear", edited("linear", TRANSPOSED_DW))
    assert main(["check", "linear", "--dir", str(tmp_path)]) == 1
    assert "the transpose of the right answer" in capsys.readouterr().out


def test_a_failure_is_shown_at_the_smallest_shape_that_shows_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(checking, "SHRINK_SECONDS", 60.0)  # time for hypothesis to finish shrinking, however busy
    # A mean over rows is the sum while there is one row: the smallest failure has two rows and width 1.
    write(tmp_path, "linear", edited("linear", MEAN_DB))
    status, out, _ = run(capsys, "check", "linear", "--dir", str(tmp_path))
    assert status == 1
    assert re.search(r"failed at x (1x2|2x1)x1, w 1x2, b 2, ", out), out.splitlines()[0]


def test_start_writes_the_forward_as_it_is_and_withholds_the_backward(tmp_path, capsys):
    for name in NAMES:
        assert main(["start", name, "--dir", str(tmp_path)]) == 0
    capsys.readouterr()
    rng = numpy.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4))
    calls = {
        "linear": (x, rng.normal(size=(4, 5)), rng.normal(size=5)),
        "gelu": (x,),
        "softmax": (x,),
        "layernorm": (x, rng.normal(size=4), rng.normal(size=4)),
        "cross_entropy": (x, rng.integers(0, 4, size=(2, 3))),
        "embedding": (rng.integers(0, 4, size=(2, 3)), rng.normal(size=(4, 4)), rng.normal(size=(5, 4))),
        "mlp": (x, rng.normal(size=(4, 16)), rng.normal(size=16), rng.normal(size=(16, 4)), rng.normal(size=4)),
        "attention": (x, rng.normal(size=(4, 12)), rng.normal(size=12), rng.normal(size=(4, 4)), rng.normal(size=4),
                      2),
    }
    for name, inputs in calls.items():
        text = (tmp_path / f"{name}.py").read_text()
        namespace = {}
        exec(compile(text, name, "exec"), namespace)
        out, cache = namespace["forward"](*inputs)
        assert numpy.array_equal(out, getattr(minillm.layers, name).forward(*inputs)[0]), name
        docstring = ast.get_docstring(ast.parse(text))
        assert not re.search(r"^backward:", docstring, re.M) and "Derivation" not in docstring, name
        assert "forward:" in docstring and f"python -m minillm.exercises hint {name}" in docstring, name
        with pytest.raises(NotImplementedError, match="not written yet"):
            namespace["backward"](out, cache)

    block = (tmp_path / "block.py").read_text()
    assert inspect.getsource(minillm.model.block_forward) in block
    assert "weight_grads=tuning.wants(*names)" in block
    adamw = (tmp_path / "adamw.py").read_text()
    assert "m_hat = m / (1 - beta1^t)" in adamw and "def adamw_update(p, g, m, v, lr, t, beta1, beta2" in adamw


def test_start_never_overwrites_a_file_without_force(tmp_path, capsys):
    write(tmp_path, "gelu", "my work\n")
    status, out, err = run(capsys, "start", "gelu", "--dir", str(tmp_path))
    assert status == 2 and not out and len(err.splitlines()) == 1 and "--force" in err, err
    assert (tmp_path / "gelu.py").read_text() == "my work\n"
    assert main(["start", "gelu", "--dir", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "gelu.py").read_text() == source.exercise_file(catalog.BY_NAME["gelu"])


def test_an_unknown_exercise_is_one_line_naming_them_all(tmp_path, capsys):
    folder = str(tmp_path)
    for argv in (["start", "relu", "--dir", folder], ["check", "relu", "--dir", folder], ["hint", "relu"]):
        status, out, err = run(capsys, *argv)
        assert status == 2 and len(err.splitlines()) == 1 and "linear, gelu" in err and "adamw" in err, err


def test_a_syntax_error_is_one_line_with_the_file_and_line(tmp_path, capsys):
    write(tmp_path, "linear", edited("linear", ("dx = dout @ w.T", "dx = dout @ w.T)")))
    status, out, err = run(capsys, "check", "linear", "--dir", str(tmp_path))
    line = next(i for i, text in enumerate(solution("linear").splitlines(), 1) if "dx = dout @ w.T" in text)
    assert status == 1
    assert out == f"{tmp_path / 'linear.py'}:{line}: SyntaxError: unmatched ')'\n", out


def test_an_exception_shows_the_learners_frames_only(tmp_path, capsys):
    write(tmp_path, "mlp", edited("mlp", ("dh = gelu.backward(dg, gelu_cache)", "dh = helper(dg, fc_cache)"))
          + "\n\ndef helper(dg, cache):\n    return gelu.backward(dg, cache)\n")
    status, out, err = run(capsys, "check", "mlp", "--dir", str(tmp_path))
    assert status == 1, out + err
    lines = out.splitlines()
    files = [line for line in lines if line.lstrip().startswith("File ")]
    assert [line.split(", in ")[1] for line in files] == ["backward", "helper"], out
    assert all(f'"{tmp_path / "mlp.py"}"' in line for line in files), out
    assert "hypothesis" not in out and "minillm/" not in out, out
    assert lines[-1].startswith("ValueError: "), out


def test_a_blank_backward_is_not_written_yet_and_a_missing_file_names_start(tmp_path, capsys):
    assert main(["start", "softmax", "--dir", str(tmp_path)]) == 0
    capsys.readouterr()
    status, out, _ = run(capsys, "check", "softmax", "--dir", str(tmp_path))
    assert status == 1 and "backward is not written yet" in out and len(out.splitlines()) == 1, out
    status, out, err = run(capsys, "check", "gelu", "--dir", str(tmp_path))
    assert status == 1 and not out and len(err.splitlines()) == 1, err
    assert "is not there" in err and f"start gelu --dir {tmp_path}" in err, err


def test_check_without_hypothesis_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    write(tmp_path, "gelu", solution("gelu"))
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    status, out, err = run(capsys, "check", "gelu", "--dir", str(tmp_path))
    assert status == 2 and len(err.splitlines()) == 1 and 'pip install -e ".[exercises]"' in err, err


def docstring_lines(text):
    return {line.strip() for line in text.splitlines() if line.strip()}


@pytest.mark.parametrize("name", NAMES)
def test_hints_are_the_reference_docstrings_steps(capsys, name):
    exercise = catalog.BY_NAME[name]
    if exercise.kind == "layer":
        text = ast.get_docstring(ast.parse(exercise.reference.read_text()))
        section = text[text.index("\nbackward:"):].replace("backward:", "", 1)
    elif exercise.kind == "block":
        text = section = inspect.getsource(minillm.model)
    else:
        text = section = inspect.getdoc(minillm.optim)
    steps = source.hints(exercise)
    assert len(steps) >= 3
    for k, step in enumerate(steps, 1):
        status, out, _ = run(capsys, "hint", name, str(k))
        assert status == 0 and out.startswith(f"hint {k} of {len(steps)} ({name}):\n"), out
        for line in step.splitlines():
            assert line.strip() in section or line.strip() in " ".join(section.split()), (name, k, line)
    status, out, err = run(capsys, "hint", name, str(len(steps) + 1))
    assert status == 2 and f"has {len(steps)} hints" in err


def test_hint_steps_split_at_the_base_indent_and_join_continued_lines():
    steps = source.hints(catalog.BY_NAME["layernorm"])
    assert steps[0] == "dw    = sum over rows of dout * xhat"
    assert steps[-1].startswith("Derivation of dx") and steps[-1].endswith("the last the path through var.")
    embedding = source.hints(catalog.BY_NAME["embedding"])
    assert len(embedding) == 3 and embedding[2].startswith("The dwte sum") and embedding[2].endswith("repeats).")
    linear = source.hints(catalog.BY_NAME["linear"])
    assert linear[0].splitlines()[1].strip() == "out_rj = sum_i x_ri w_ij + b_j"  # the deeper line joins its step


def test_list_shows_each_status_and_the_status_file_follows_the_files(tmp_path, capsys):
    write(tmp_path, "linear", solution("linear"))
    assert main(["start", "gelu", "--dir", str(tmp_path)]) == 0
    capsys.readouterr()
    status, out, _ = run(capsys, "list", "--dir", str(tmp_path))
    assert status == 0
    statuses = {line.split()[1]: line.split(maxsplit=2)[2] for line in out.splitlines()[1:]}
    assert list(statuses) == NAMES
    assert statuses["linear"].startswith("passed ") and statuses["gelu"].startswith("failing ")
    assert statuses["softmax"].startswith("not started ")

    saved = json.loads((tmp_path / ".status.json").read_text())
    assert saved["linear"]["status"] == "passed" and saved["gelu"]["reason"] == "not written yet"
    write(tmp_path, "linear", edited("linear", ("dx = dout @ w.T", "dx = -(dout @ w.T)")))
    assert checking.status(catalog.BY_NAME["linear"], tmp_path) == ("failing", "x wrong")


def test_learner_layers_uses_what_passes_and_wires_the_composites_to_it(tmp_path):
    for name in ("linear", "softmax", "attention", "adamw"):
        write(tmp_path, name, solution(name))
    write(tmp_path, "gelu", edited("gelu", ("dt_du = 1.0 - t ** 2", "dt_du = 1.0 - t")))
    found = learner_layers(tmp_path)
    assert found.theirs == ["linear", "softmax", "attention", "adamw"]
    assert found.not_used["gelu"] == "failing: x wrong" and found.not_used["mlp"] == "not started"
    layers = found.layers
    assert sorted(vars(layers)) == sorted(["embedding", "dropout", "layernorm", "attention", "mlp", "linear",
                                           "cross_entropy", "block_backward"])
    assert layers.linear.__file__ == str((tmp_path / "linear.py").resolve())
    assert layers.layernorm is minillm.layers.layernorm and layers.block_backward is minillm.model.block_backward
    assert layers.attention.__file__ == str((tmp_path / "attention.py").resolve())
    assert layers.attention.linear is layers.linear
    assert layers.attention.softmax.__file__ == str((tmp_path / "softmax.py").resolve())
    # The reference's mlp is a copy of its own whose linear is the learner's; minillm.layers is left as it was.
    assert layers.mlp is not minillm.layers.mlp and layers.mlp.linear is layers.linear
    assert layers.mlp.gelu is minillm.layers.gelu
    assert minillm.layers.mlp.linear is minillm.layers.linear
    assert minillm.layers.attention.linear is minillm.layers.linear
    assert found.adamw_update.__code__.co_filename == str((tmp_path / "adamw.py").resolve())

    model = minillm.model.GPT(minillm.model.GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=2, n_embd=4),
                              dtype="float64", layers=layers)
    reference = minillm.model.GPT(model.config, dtype="float64", reference=True)
    idx = numpy.random.default_rng(0).integers(0, 7, size=(2, 4))
    numpy.testing.assert_allclose(model(idx, idx)[1], reference(idx, idx)[1], rtol=1e-12)


def test_learner_layers_of_a_missing_folder_is_an_exercise_error(tmp_path):
    with pytest.raises(ExerciseError, match="not a folder of exercises"):
        learner_layers(tmp_path / "nothing")
    assert issubclass(ExerciseError, ValueError)


def test_the_module_runs_as_a_command(tmp_path):
    def command(*argv):
        return subprocess.run([sys.executable, "-m", "minillm.exercises", *argv], capture_output=True, text=True)

    started = command("start", "cross_entropy", "--dir", str(tmp_path))
    assert started.returncode == 0 and "wrote " in started.stdout, started.stderr
    checked = command("check", "cross_entropy", "--dir", str(tmp_path))
    assert checked.returncode == 1 and "not written yet" in checked.stdout, checked.stdout + checked.stderr


def test_a_file_without_its_backward_fails_in_one_line_and_is_not_used_for_training(tmp_path, capsys):
    (tmp_path / "softmax.py").write_text("def forward(s):\n    return s, s\n")
    assert main(["check", "softmax", "--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "there is no function backward" in out and "Traceback" not in out
    assert learner_layers(tmp_path).not_used["softmax"] == "failing: no backward"
