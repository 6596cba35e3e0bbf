"""train.py --log-layers: each parameter group's gradient norm and update/weight ratio, without changing training.

The norms must be the norms of the gradients model.backward() returns (before clipping),
the ratios those of the parameters' actual change; a run with the flag must take exactly
the steps of a run without it, and a run without it must not build the watch at all.
"""

import json

import numpy
import pytest

from minillm import backend, checkpoint, training
from minillm.health import LayerWatch, group_of
from minillm.model import GPT, GPTConfig, parameter_shapes
from minillm.optim import AdamW
from minillm.readback import NonfiniteWatch
from minillm.training import TrainConfig, train, train_step

TINY = dict(
    n_layer=2, n_head=2, n_embd=16, block_size=8, batch_size=4, grad_accum=2, dropout=0.1, max_iters=8,
    warmup_iters=2, lr_decay_iters=8, eval_interval=4, eval_iters=2, save_interval=4, log_interval=3,
    sample_tokens=4, threads=2, device="cpu",
)
CONFIG = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)


def test_each_parameter_belongs_to_its_layers_group():
    config = GPTConfig(vocab_size=5, block_size=4, n_layer=2, n_head=1, n_embd=4, lora_rank=2, lora_targets="attn,mlp")
    groups = {name: group_of(name) for name in parameter_shapes(config)}
    assert groups["wte.weight"] == "wte" and groups["wpe.weight"] == "wpe" and groups["ln_f.bias"] == "ln_f"
    assert groups["h.1.attn.c_attn.lora_a"] == groups["h.1.attn.c_proj.bias"] == "h.1.attn"
    assert groups["h.0.mlp.c_fc.weight"] == groups["h.0.mlp.c_proj.lora_b"] == "h.0.mlp"
    assert groups["h.0.ln_1.weight"] == groups["h.0.ln_2.bias"] == "h.0.ln"
    expected = {"wte", "wpe", "ln_f"} | {f"h.{i}.{kind}" for i in range(2) for kind in ("attn", "mlp", "ln")}
    assert set(groups.values()) == expected


def group_norm(arrays, group):
    """sqrt(sum of squares) over the arrays of one group, in float64."""
    return float(numpy.sqrt(sum(numpy.sum(numpy.square(a, dtype=numpy.float64))
                                for name, a in arrays.items() if group_of(name) == group)))


@pytest.mark.parametrize("grad_clip", [0.0, 0.05, 100.0], ids=["no clip", "clipped", "clip not reached"])
def test_norms_are_those_of_the_models_gradients_and_ratios_those_of_the_step(tmp_path, grad_clip):
    rng = numpy.random.default_rng(0)
    idx, targets = rng.integers(0, CONFIG.vocab_size, size=(2, 2, 8))
    direct = GPT(CONFIG, seed=4, dtype="float64")
    direct(idx, targets)
    grads = direct.backward()

    cfg = TrainConfig(grad_clip=grad_clip, lr=0.01, warmup_iters=0)
    runs = {}
    for watched in (False, True):
        model = GPT(CONFIG, seed=4, dtype="float64")
        before = {name: p.copy() for name, p in model.params.items()}
        optimizer = AdamW(model.trainable_params(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        layer_watch = LayerWatch(model.params) if watched else None
        _, grad_norm, _ = train_step(model, optimizer, lambda rng: (idx, targets), 0, cfg,
                                     NonfiniteWatch("cpu", model.dtype, tmp_path), layer_watch=layer_watch)
        runs[watched] = model.params
    for name, p in runs[True].items():
        assert numpy.array_equal(p, runs[False][name]), name  # measuring changes no number

    layers = layer_watch.report(grad_norm, grad_clip)["layers"]
    assert list(layers) == list(dict.fromkeys(group_of(name) for name in model.params))
    change = {name: runs[True][name] - before[name] for name in before}
    for group, measured in layers.items():
        assert measured["grad_norm"] == pytest.approx(group_norm(grads, group), rel=1e-9)
        assert measured["update_ratio"] == pytest.approx(group_norm(change, group) / group_norm(before, group),
                                                         rel=1e-9)
    assert sum(m["grad_norm"] ** 2 for m in layers.values()) == pytest.approx(float(grad_norm) ** 2, rel=1e-9)


def log_entries(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_log_layers_leaves_training_bit_identical_and_logs_every_group(tmp_path, corpus, monkeypatch):
    on, off = tmp_path / "on", tmp_path / "off"
    train(TrainConfig(data=str(corpus), out_dir=str(on), log_layers=True, **TINY))
    with monkeypatch.context() as patched:
        patched.setattr(training, "LayerWatch", None)  # without the flag nothing may build one
        train(TrainConfig(data=str(corpus), out_dir=str(off), **TINY))

    for name in ("last.npz", "ckpt.npz"):
        with_flag, _ = checkpoint.read_arrays(on / name)
        without, _ = checkpoint.read_arrays(off / name)
        assert with_flag.keys() == without.keys()
        for key in without:
            assert numpy.array_equal(with_flag[key], without[key]), f"{name}: {key}"
    progress_on = [e for e in log_entries(on) if "loss" in e]
    progress_off = [e for e in log_entries(off) if "loss" in e]
    assert [e["step"] for e in progress_on] == [e["step"] for e in progress_off] == [1, 3, 6]
    for a, b in zip(progress_on, progress_off):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"])
        assert "layers" not in b
        groups = {"wte", "wpe", "ln_f"} | {f"h.{i}.{kind}" for i in range(2) for kind in ("attn", "mlp", "ln")}
        assert set(a["layers"]) == groups
        assert all(m["grad_norm"] > 0 and m["update_ratio"] > 0 for m in a["layers"].values())
        assert sum(m["grad_norm"] ** 2 for m in a["layers"].values()) == pytest.approx(a["grad_norm"] ** 2, rel=1e-4)
    pytest.importorskip("matplotlib")
    assert (on / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (off / "layers.png").exists()


def test_the_watch_measures_on_the_models_device(tmp_path, xp_device):
    """Measured on a GPU, read back at report(): the host's float64 norms to float32's precision
    (skipped without one)."""
    rng = numpy.random.default_rng(1)
    idx, targets = rng.integers(0, CONFIG.vocab_size, size=(2, 2, 8))
    host = GPT(CONFIG, seed=2)
    host(idx, targets)
    grads = {name: g.astype(numpy.float64) for name, g in host.backward().items()}
    model = GPT(CONFIG, device=xp_device, params={n: backend.to_device(p, xp_device) for n, p in host.params.items()})
    watch = LayerWatch(model.params)
    _, grad_norm, _ = train_step(model, AdamW(model.trainable_params()), lambda rng: (idx, targets), 0,
                                 TrainConfig(grad_clip=0.0), NonfiniteWatch(xp_device, model.dtype, tmp_path),
                                 layer_watch=watch)
    for group, measured in watch.report(grad_norm, 0.0)["layers"].items():
        assert measured["grad_norm"] == pytest.approx(group_norm(grads, group), rel=1e-4)
        assert 0 < measured["update_ratio"] < 1
