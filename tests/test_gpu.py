"""CuPy gives NumPy's results: every layer (reference and fast), LoRA, a whole training step, a training run,
greedy decoding, checkpoints.

Each test runs once per device of the `xp_device` fixture; on the CPU it compares
NumPy with itself (which checks the test), on a GPU CuPy with NumPy. Tolerances:
relative error below 1e-4 in float32 and 1e-10 in float64. Checkpoints saved on
one device load on the other with identical numbers.
"""

import numpy
import pytest

import minillm.fast
import minillm.layers
from minillm import backend, checkpoint, data
from minillm.layers import lora
from minillm.model import GPT, GPTConfig
from minillm.optim import AdamW, clip_grad_norm
from minillm.sampling import generate
from minillm.testing import cases
from minillm.tokenizers.char import CharTokenizer
from minillm.training import TrainConfig, train

TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
CONFIG = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)


def relative_error(a, b):
    a, b = backend.to_host(a), backend.to_host(b)
    return float(numpy.abs(a - b).max() / max(numpy.abs(b).max(), 1e-300))


def layer_cases(rng, L=minillm.layers):
    """(name, forward, inputs, backward) of package L: float64 inputs on the host; no dropout, so no RNG
    stream to match."""
    x = rng.normal(size=(2, 5, 8))
    w = lambda *shape: rng.normal(size=shape)
    return [
        ("linear", L.linear.forward, (x, w(8, 5), w(5)), L.linear.backward),
        ("layernorm", L.layernorm.forward, (x, w(8), w(8)), L.layernorm.backward),
        ("gelu", L.gelu.forward, (x,), L.gelu.backward),
        ("softmax", L.softmax.forward, (x,), L.softmax.backward),
        ("mlp", L.mlp.forward, (x, w(8, 32), w(32), w(32, 8), w(8)), L.mlp.backward),
        ("attention", lambda *a: L.attention.forward(*a, 2), (x, w(8, 24), w(24), w(8, 8), w(8)),
         L.attention.backward),
        ("embedding", L.embedding.forward, (rng.integers(0, 5, (2, 5)), w(5, 8), w(6, 8)), L.embedding.backward),
        ("cross_entropy", lambda z, y: L.cross_entropy.forward(z, y), (w(2, 5, 7), numpy.array([[1, 2, -1, 0, 6]] * 2)),
         lambda dloss, cache: (L.cross_entropy.backward(1.0, cache),)),
    ]


def on(arrays, device, dtype=None):
    return [backend.to_device(a if dtype is None or a.dtype.kind != "f" else a.astype(dtype), device) for a in arrays]


@pytest.mark.parametrize("package", [minillm.layers, minillm.fast], ids=["reference", "fast"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", range(8), ids=[c[0] for c in layer_cases(numpy.random.default_rng(0))])
def test_every_layer_forward_and_backward(xp_device, dtype, case, package):
    name, forward, inputs, backward = layer_cases(numpy.random.default_rng(0), package)[case]
    inputs = on(inputs, "cpu", dtype)
    out, cache = forward(*inputs)
    dout = numpy.random.default_rng(1).normal(size=out.shape).astype(out.dtype)
    expected = [g for g in backward(dout, cache) if g is not None]
    out_d, cache_d = forward(*on(inputs, xp_device))
    got = [g for g in backward(backend.to_device(dout, xp_device), cache_d) if g is not None]
    assert relative_error(out_d, out) < TOLERANCE[dtype], name
    assert backend.to_host(out_d).dtype == out.dtype  # no promotion on the device either
    for g_d, g in zip(got, expected):
        assert relative_error(g_d, g) < TOLERANCE[dtype], name


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lora_forward_and_backward(xp_device, dtype):
    rng = numpy.random.default_rng(0)
    w, a, b, G = (rng.normal(size=s).astype(dtype) for s in ((16, 24), (16, 4), (4, 24), (16, 24)))
    out, cache = lora.forward(w, a, b, 2.0)
    out_d, cache_d = lora.forward(*on((w, a, b), xp_device), 2.0)
    assert relative_error(out_d, out) < TOLERANCE[dtype]
    for g_d, g in zip(lora.backward(backend.to_device(G, xp_device), cache_d), lora.backward(G, cache)):
        assert relative_error(g_d, g) < TOLERANCE[dtype]


def model_on(device, dtype, reference=False):
    """A model with the same weights on any device (the device's generator draws other numbers)."""
    on_cpu = GPT(CONFIG, seed=0, dtype=dtype)
    model = GPT(CONFIG, seed=0, dtype=dtype, device=device, reference=reference)
    for name, p in on_cpu.params.items():
        model.params[name][...] = backend.to_device(p, device)
    return model


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_training_step_with_clipping_and_adamw(xp_device, dtype, reference):
    """The fast path on the CPU against either path on the device."""
    idx = numpy.random.default_rng(0).integers(0, CONFIG.vocab_size, (3, CONFIG.block_size))
    results = []
    for device in ("cpu", xp_device):
        model = model_on(device, dtype, reference=reference and device != "cpu")
        optimizer = AdamW(model.params, lr=1e-2, reference=model.reference)
        for _ in range(2):
            _, loss = model(idx, idx)
            grads = model.backward()
            clip_grad_norm(grads, 0.5)
            optimizer.step(grads)
        results.append((float(loss), model.params))
    (cpu_loss, cpu_params), (loss, params) = results
    assert abs(loss - cpu_loss) <= TOLERANCE[dtype] * abs(cpu_loss)
    for name, p in cpu_params.items():
        assert backend.device_of(params[name]) == xp_device
        assert relative_error(params[name], p) < TOLERANCE[dtype], name


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
def test_greedy_decoding_with_the_cache_gives_the_same_tokens(xp_device, reference):
    prompt = numpy.array([[1, 2, 3]])
    tokens = [backend.to_host(generate(model_on(device, "float64", reference).eval(), prompt, 12, temperature=0))
              for device in ("cpu", xp_device)]
    assert numpy.array_equal(tokens[0], tokens[1])


def test_a_checkpoint_crosses_devices_both_ways(xp_device, tmp_path):
    tokenizer = CharTokenizer("abcdefghijklm")
    for source, target in (("cpu", xp_device), (xp_device, "cpu")):
        model = model_on(source, "float32")
        optimizer = AdamW(model.params)
        path = tmp_path / f"{source}-to-{target}.npz"
        checkpoint.save(path, model, tokenizer, optimizer, step=1)
        loaded, _, _, state = checkpoint.load(path, device=target)
        for name, p in model.params.items():
            assert backend.device_of(loaded.params[name]) == target
            assert numpy.array_equal(backend.to_host(loaded.params[name]), backend.to_host(p)), name
        assert set(state["m"]) == set(model.params)


def test_a_training_run_ends_with_the_cpu_runs_weights(xp_device, tmp_path):
    # float64 and no dropout: the batches come from the same host generator on both devices,
    # so the two runs differ by rounding only. The GPU run reads back at its sync points.
    corpus = tmp_path / "text.txt"
    corpus.write_text(data.builtin_corpus()[:20_000])
    models = [
        train(TrainConfig(
            data=str(corpus), out_dir=str(tmp_path / f"run{i}"), device=device, dtype="float64", n_layer=2, n_head=2,
            n_embd=16, block_size=16, batch_size=4, dropout=0.0, max_iters=12, warmup_iters=2, lr_decay_iters=12,
            eval_interval=6, eval_iters=2, save_interval=6, log_interval=4, sample_tokens=8,
        ))
        for i, device in enumerate(("cpu", xp_device))
    ]
    for name, p in models[0].params.items():
        assert backend.device_of(models[1].params[name]) == xp_device
        assert relative_error(models[1].params[name], p) < 1e-8, name


@pytest.mark.parametrize("layers", [minillm.layers, minillm.fast], ids=["reference", "fast"])
def test_the_gradient_checker_passes_every_layer_on_the_device(xp_device, layers):
    """minillm.testing computes on the arrays' device: the cases moved there pass, with dropout on."""
    sizes = cases.Sizes(batch=2, time=3, n_head=2, head_size=2, vocab=5)
    for name in cases.LAYER_NAMES:
        cases.layer_case(name, getattr(layers, name), sizes, seed=1, dropout_p=0.3).on(xp_device).check().assert_ok()
