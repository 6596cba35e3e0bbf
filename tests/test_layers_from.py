"""The model, AdamW and train.py on a layer set of their own: `python train.py --layers-from exercises/`.

- GPT(config, layers=minillm.layers) is GPT(config, reference=True), to the bit; a layer set's own
  block_backward is the one the backward pass calls, on every thread; finetune.with_lora(),
  finetune.merged() and replica() keep the layers;
- AdamW(update=f) and ShardedAdamW(update=f) take their steps with f;
- a learner whose every layer file is the reference's trains with the losses of --reference, on
  one thread and on the default count, and is told that the layers are theirs;
- a --layers-from folder that is not there is a one-line usage error.
"""

import json
import shutil
import types
from pathlib import Path

import numpy
import pytest

import minillm.fast
import minillm.layers
from minillm import distributed, finetune, gradcheck, parallel, train_cli
from minillm.model import GPT, GPTConfig, block_backward
from minillm.optim import AdamW, adamw_update
from minillm.training import TrainConfig, train
from minillm.zero import ShardedAdamW

CONFIG = GPTConfig(vocab_size=7, block_size=6, n_layer=2, n_head=2, n_embd=8, dropout=0.2)
LAYER_NAMES = ("embedding", "dropout", "layernorm", "attention", "mlp", "linear", "cross_entropy")
LEARNER_FILES = ("linear", "gelu", "softmax", "layernorm", "cross_entropy", "embedding", "attention", "mlp")
TINY = dict(
    n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=4, dropout=0.1, max_iters=6, warmup_iters=2,
    eval_interval=3, eval_iters=2, save_interval=3, log_interval=1, sample_tokens=8, device="cpu",
)


def reference_namespace(**extra):
    """minillm.layers' modules as a plain namespace, as a learner's layer set is given."""
    return types.SimpleNamespace(**{name: getattr(minillm.layers, name) for name in LAYER_NAMES}, **extra)


def forward_backward(model, seed=3):
    rng = numpy.random.default_rng(seed)
    idx, targets = (rng.integers(0, CONFIG.vocab_size, (3, CONFIG.block_size)) for _ in range(2))
    model.reseed(seed)
    logits, loss = model(idx, targets)
    return logits, loss, model.backward()


def model_on(**options):
    model = GPT(CONFIG, seed=1, dtype="float64", **options)
    gradcheck.randomize(model.params, 1)
    return model


def assert_same(got, expected):
    (logits, loss, grads), (expected_logits, expected_loss, expected_grads) = got, expected
    assert numpy.array_equal(logits, expected_logits) and numpy.array_equal(loss, expected_loss)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        assert numpy.array_equal(grads[name], expected_grads[name]), name


def test_the_reference_modules_given_as_layers_are_the_reference():
    expected = forward_backward(model_on(reference=True))
    for layers in (minillm.layers, reference_namespace()):
        model = model_on(layers=layers)
        assert model.layers is layers and model.reference == (layers is minillm.layers)
        assert_same(forward_backward(model), expected)


def test_a_layer_set_with_its_own_block_backward_has_it_called_on_every_thread():
    calls = []

    def recording_block_backward(layers, dx, cache, prefix, tuning):
        calls.append(prefix)
        return block_backward(layers, dx, cache, prefix, tuning)

    layers = reference_namespace(block_backward=recording_block_backward)
    assert_same(forward_backward(model_on(layers=layers)), forward_backward(model_on(reference=True)))
    assert calls == ["h.1.", "h.0."]

    calls.clear()
    sharded = parallel.ShardedGPT(model_on(layers=layers), 2)
    try:
        assert all(replica.layers is layers for replica in sharded.replicas)
        rng = numpy.random.default_rng(0)
        idx, targets = (rng.integers(0, CONFIG.vocab_size, (4, CONFIG.block_size)) for _ in range(2))
        sharded(idx, targets)
        sharded.backward()
    finally:
        sharded.close()
    assert sorted(calls) == ["h.0.", "h.0.", "h.1.", "h.1."]


def test_lora_merging_replicas_and_the_reference_switch_keep_or_pick_the_layers():
    layers = reference_namespace()
    model = GPT(CONFIG, layers=layers)
    adapted = finetune.with_lora(model, 2)
    assert adapted.layers is layers and finetune.merged(adapted).layers is layers and model.replica().layers is layers
    model.reference = True
    assert model.layers is minillm.layers and model.reference
    model.reference = False
    assert model.layers is minillm.fast and not model.reference


def recording_update(calls):
    def update(p, g, m, v, lr, t, beta1, beta2, eps, weight_decay):
        calls.append(t)
        adamw_update(p, g, m, v, lr, t, beta1, beta2, eps, weight_decay)

    return update


def test_adamw_takes_its_steps_with_the_update_it_is_given():
    rng = numpy.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=4)}
    grads = {name: rng.normal(size=p.shape) for name, p in params.items()}
    theirs = {name: p.copy() for name, p in params.items()}
    calls = []
    for optimizer in (AdamW(params, lr=0.1, reference=True), AdamW(theirs, lr=0.1, update=recording_update(calls))):
        optimizer.step(grads)
        optimizer.step(grads)
    assert calls == [1, 1, 2, 2]
    for name in params:
        assert numpy.array_equal(theirs[name], params[name]), name


def test_sharded_adamw_takes_its_steps_with_the_update_it_is_given():
    expected, model = GPT(CONFIG, seed=1, dtype="float64"), GPT(CONFIG, seed=1, dtype="float64")
    grads = {name: numpy.random.default_rng(0).normal(size=p.shape) for name, p in model.params.items()}
    calls = []
    AdamW(expected.params, lr=0.1, reference=True).step(grads)
    sharded = ShardedAdamW(model, distributed.SINGLE_PROCESS, lr=0.1, update=recording_update(calls))
    sharded.step(sharded.sum_gradients(0.0, grads)[1])
    assert calls == [1] * len(model.params)
    for name, p in model.params.items():
        assert numpy.array_equal(p, expected.params[name]), name


def losses(out_dir):
    """Every training and evaluation loss of a run's log, in order."""
    entries = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return [entry[key] for entry in entries for key in ("loss", "train_loss", "val_loss") if key in entry]


@pytest.mark.parametrize("threads", [1, 0])  # 0: one per core, the batch split across threads where there are several
def test_a_learner_whose_layers_are_all_right_trains_with_the_losses_of_the_reference(tmp_path, corpus, capsys,
                                                                                      threads):
    exercises = tmp_path / "exercises"
    exercises.mkdir()
    for name in LEARNER_FILES:
        shutil.copy(Path(minillm.layers.__file__).parent / f"{name}.py", exercises)
    options = dict(data=str(corpus), threads=threads, **TINY)
    train(TrainConfig(out_dir=str(tmp_path / "reference"), reference=True, **options))
    capsys.readouterr()
    best = train(TrainConfig(out_dir=str(tmp_path / "theirs"), layers_from=str(exercises), **options))

    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("layers from ")]
    assert len(lines) == 1, lines
    yours = lines[0].split("yours: ", 1)[1].split(";")[0].split(", ")
    assert set(LEARNER_FILES) <= set(yours), lines[0]
    assert best.layers not in (minillm.layers, minillm.fast)  # the best checkpoint samples on their layers too
    expected = losses(tmp_path / "reference")
    assert len(expected) > 6
    numpy.testing.assert_allclose(losses(tmp_path / "theirs"), expected, rtol=1e-5)


def layers_from_error(tmp_path, corpus, capsys, folder):
    """The one line on stderr of train.py --layers-from folder, after checking its exit status (2: usage)."""
    flags = [str(item) for name, value in TINY.items() for item in (f"--{name.replace('_', '-')}", value)]
    status = train_cli.main(["--data", str(corpus), "--out-dir", str(tmp_path / "out"), "--layers-from", folder,
                             *flags])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("train.py: error: --layers-from"), err
    return err


def test_a_layers_from_folder_that_is_not_there_or_empty_is_a_one_line_error(tmp_path, corpus, capsys):
    assert "no-such-folder" in layers_from_error(tmp_path, corpus, capsys, str(tmp_path / "no-such-folder"))
    assert "empty" in layers_from_error(tmp_path, corpus, capsys, "")
