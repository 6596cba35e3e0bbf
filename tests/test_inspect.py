"""Looking inside a model: kept attention weights, per-position predictions, and python -m minillm.inspect.

The attention weights kept (keep_weights, GPT.keep_attention) must be the softmax the layer
itself computed and then used: the very array in the reference, each causal block's rows in
the fast layer, and the output recomputed from them equals the layer's output. The
predictions must agree with cross_entropy on the same text and come from the same logits.
The command runs end to end on a tiny model (valid PNG files and JSON, the table), without
matplotlib too, and refuses a bad --layer, --head or an empty prompt with one line.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
from hypothesis import given, strategies as st

import minillm
import minillm.fast as fast
import minillm.layers as layers
from minillm import backend, checkpoint, hf
from minillm.inspect import TOP_GUESSES, look_inside, main
from minillm.model import GPT, GPTConfig
from minillm.tokenizers.bpe import BPETokenizer
from minillm.tokenizers.char import CharTokenizer

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXT = "the cat sat on the mat; the dog sat on the log.\n"
TINY = GPTConfig(vocab_size=len(set(TEXT)), block_size=16, n_layer=2, n_head=3, n_embd=12)


def attention_inputs(B, T, n_head, hs, seed):
    rng = numpy.random.default_rng(seed)
    C = n_head * hs
    return (rng.normal(size=(B, T, C)), rng.normal(size=(C, 3 * C)), rng.normal(size=3 * C),
            rng.normal(size=(C, C)) / C**0.5, rng.normal(size=C))


def output_from(P, v, w_proj, b_proj):
    """out = merge_heads(P @ v) @ w_proj + b_proj: attention's last lines, from the kept weights."""
    Y = P @ v
    B, n_head, T, hs = Y.shape
    return Y.transpose(0, 2, 1, 3).reshape(B, T, n_head * hs) @ w_proj + b_proj


@given(B=st.integers(1, 2), T=st.integers(1, 9), n_head=st.integers(1, 3), hs=st.integers(1, 3),
       query_block=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_the_kept_weights_are_the_softmax_the_layer_computed_and_used(B, T, n_head, hs, query_block, seed):
    inputs = attention_inputs(B, T, n_head, hs, seed)
    w_proj, b_proj = inputs[3:]
    kept_reference, kept_fast = [], []
    out, cache = layers.attention.forward(*inputs, n_head, keep_weights=kept_reference)
    fast_out, fast_cache = fast.attention.forward(*inputs, n_head, keep_weights=kept_fast, query_block=query_block)

    [P] = kept_reference
    assert P is cache[5]  # the reference keeps P = softmax(S) itself, the array its backward uses
    numpy.testing.assert_allclose(output_from(P, cache[3], w_proj, b_proj), out, rtol=1e-12, atol=1e-12)
    [P_fast] = kept_fast
    for a, b, _, softmax_out, _ in fast_cache[4]:  # each causal block's softmax, in its place
        assert numpy.array_equal(P_fast[:, :, a:b, :b], softmax_out)
    numpy.testing.assert_allclose(output_from(P_fast, fast_cache[3], w_proj, b_proj), fast_out, rtol=1e-12, atol=1e-12)
    for weights in (P, P_fast):
        assert weights.shape == (B, n_head, T, T)
        numpy.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
        assert numpy.all(weights[..., numpy.triu(numpy.ones((T, T), dtype=bool), k=1)] == 0.0)
    numpy.testing.assert_allclose(P_fast, P, rtol=0, atol=1e-12)


@pytest.mark.parametrize("package", [layers, fast], ids=["reference", "fast"])
def test_decoding_keeps_the_new_queries_against_every_key(package):
    inputs = attention_inputs(1, 5, 2, 2, seed=3)
    x, weights = inputs[0], inputs[1:]
    kv_cache = package.attention.KVCache(1, 2, 5, 2, x.dtype, numpy)
    package.attention.forward(x[:, :3], *weights, 2, kv_cache=kv_cache)
    kept = []
    package.attention.forward(x[:, 3:], *weights, 2, kv_cache=kv_cache, keep_weights=kept)
    full = []
    layers.attention.forward(x, *weights, 2, keep_weights=full)
    assert kept[0].shape == (1, 2, 2, 5)
    numpy.testing.assert_allclose(kept[0], full[0][:, :, 3:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("reference", [True, False], ids=["reference", "fast"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_the_model_keeps_every_layers_weights_only_when_asked(reference, training):
    model = GPT(TINY, seed=1, dtype="float64", reference=reference).train(training)
    idx = numpy.random.default_rng(0).integers(0, TINY.vocab_size, size=(2, 7))
    logits, _ = model(idx)
    assert model.attention_weights is None
    model.keep_attention = True
    kept_logits, _ = model(idx)
    assert numpy.array_equal(kept_logits, logits)
    assert len(model.attention_weights) == TINY.n_layer
    for P in model.attention_weights:
        assert P.shape == (2, TINY.n_head, 7, 7)
        numpy.testing.assert_allclose(P.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
    model.keep_attention = False
    model(idx)
    assert model.attention_weights is None


def char_model(seed=0, dtype="float64", config=TINY):
    tokenizer = CharTokenizer.from_text(TEXT)
    return GPT(config, seed=seed, dtype=dtype), tokenizer


def test_predictions_agree_with_cross_entropy_and_come_from_the_same_logits():
    model, tokenizer = char_model()
    ids = tokenizer.encode(TEXT[:TINY.block_size])
    found = look_inside(model, tokenizer, ids)
    logits, mean_loss = model.eval()(numpy.array([ids[:-1]]), numpy.array([ids[1:]]))
    assert [p["position"] for p in found["predictions"]] == list(range(1, len(ids)))
    for p in found["predictions"]:
        t = p["position"]
        loss, _ = layers.cross_entropy.forward(logits[0, t - 1], numpy.array(ids[t]))
        assert p["id"] == ids[t] and p["token"] == TEXT[t]
        assert p["loss"] == pytest.approx(float(loss), rel=1e-12)
        assert p["probability"] == pytest.approx(numpy.exp(-float(loss)), rel=1e-12)
        probabilities = numpy.exp(logits[0, t - 1] - logits[0, t - 1].max())
        probabilities /= probabilities.sum()
        guessed = [g["id"] for g in p["guesses"]]
        assert len(guessed) == TOP_GUESSES
        assert guessed == list(numpy.argsort(-probabilities, kind="stable")[:TOP_GUESSES])
        shown = [g["probability"] for g in p["guesses"]]
        assert shown == sorted(shown, reverse=True)
        numpy.testing.assert_allclose(shown, probabilities[guessed], rtol=1e-12)
    assert found["mean_loss"] == pytest.approx(float(mean_loss), rel=1e-12)
    assert found["tokens"] == list(TEXT[:TINY.block_size])
    assert found["attention"].shape == (TINY.n_layer, TINY.n_head, len(ids), len(ids))


def test_looking_inside_leaves_the_model_as_it_was():
    model, tokenizer = char_model()
    look_inside(model, tokenizer, tokenizer.encode("the"))
    assert model.training and not model.keep_attention and model.attention_weights is None


# ------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random char model's checkpoint (float32, as train.py writes them)."""
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.npz"
    model, tokenizer = char_model(dtype="float32")
    checkpoint.save(path, model, tokenizer)
    return path


def run(capsys, *args):
    """main() on these flags: (exit status, stdout, stderr); usage errors exit through SystemExit."""
    try:
        status = main([str(a) for a in args])
    except SystemExit as stop:
        status = stop.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_the_command_writes_pictures_json_and_the_table(ckpt, tmp_path):
    """As a user runs it, a separate process: python -m minillm.inspect."""
    prompt = "the cat sat"
    result = subprocess.run(
        [sys.executable, "-m", "minillm.inspect", "--ckpt", ckpt, "--prompt", prompt, "--out-dir", tmp_path],
        cwd=ROOT, capture_output=True, text=True, encoding="utf-8", timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr and "Glyph" not in result.stderr  # every token's label drawable
    assert_png(tmp_path / "attention.png")
    assert_png(tmp_path / "predictions.png")
    document = json.loads((tmp_path / "inspect.json").read_text(encoding="utf-8"))
    assert document["prompt"] == prompt and document["tokens"] == list(prompt)
    assert numpy.array(document["attention"]).shape == (TINY.n_layer, TINY.n_head, len(prompt), len(prompt))
    assert len(document["predictions"]) == len(prompt) - 1 and len(document["next"]) == TOP_GUESSES
    table = result.stdout.splitlines()
    assert table[0].split()[:4] == ["pos", "token", "p(token)", "loss"]
    for p in document["predictions"]:  # a row per position: its token, probability and loss
        row = table[1 + p["position"]]
        assert row.split()[0] == str(p["position"]) and repr(p["token"]) in row
        assert f"{p['probability']:.4f} {p['loss']:>7.3f}" in row


def test_one_layer_and_head_is_one_large_map(ckpt, tmp_path, capsys):
    status, out, err = run(capsys, "--ckpt", ckpt, "--prompt", "the dog", "--out-dir", tmp_path,
                           "--layer", 1, "--head", 2)
    assert status == 0, err
    assert_png(tmp_path / "attention.png")
    from PIL import Image  # matplotlib's own dependency

    with Image.open(tmp_path / "attention.png") as one, Image.open(grid_of(ckpt, tmp_path.parent / "grid")) as grid:
        # the one map is drawn larger than a map of the grid
        assert one.size[0] > grid.size[0] / TINY.n_head and one.size[1] > grid.size[1] / TINY.n_layer


def grid_of(ckpt, out_dir):
    assert main(["--ckpt", str(ckpt), "--prompt", "the dog", "--out-dir", str(out_dir)]) == 0
    return out_dir / "attention.png"


def test_a_gpt2_directory_works_as_init_from(tmp_path, capsys):
    tokenizer = BPETokenizer.train(TEXT * 3, 256 + 8 + 1)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=8)
    hf.save_pretrained(GPT(config, seed=0), tmp_path / "gpt2", tokenizer)
    status, out, err = run(capsys, "--init-from", tmp_path / "gpt2", "--prompt", "the cat", "--out-dir", tmp_path / "o")
    assert status == 0, err
    document = json.loads((tmp_path / "o" / "inspect.json").read_text(encoding="utf-8"))
    assert "".join(document["tokens"]) == "the cat" and document["ids"] == tokenizer.encode("the cat")


def test_without_matplotlib_the_table_and_json_are_still_written(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.delitem(sys.modules, "minillm.inspect_plots", raising=False)
    monkeypatch.delattr(minillm, "inspect_plots", raising=False)
    status, out, err = run(capsys, "--ckpt", ckpt, "--prompt", "the cat", "--out-dir", tmp_path)
    assert status == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inspect.json"]
    assert "p(token)" in out
    [note] = err.splitlines()
    assert "matplotlib" in note and "inspect.json" in note


@pytest.mark.parametrize(
    "flags, status, fragments",
    [
        (["--layer", "2"], 2, ["--layer 2", "2 layers", "0 to 1"]),
        (["--layer", "-1"], 2, ["--layer -1"]),
        (["--head", "3"], 2, ["--head 3", "3 heads", "0 to 2"]),
        (["--head", "x"], 2, ["--head", "'x'"]),
        (["--prompt", ""], 2, ["--prompt is empty"]),
        (["--prompt", "\u2603"], 1, ["cannot encode the prompt", "\u2603"]),
        (["--ckpt", "missing.npz"], 1, ["missing.npz", "no such checkpoint"]),
    ],
    ids=["layer too large", "negative layer", "head too large", "head not a number", "empty prompt",
         "unknown character", "no checkpoint"],
)
def test_bad_input_is_one_line_and_a_failing_status(ckpt, tmp_path, capsys, flags, status, fragments):
    given = dict(zip(flags[::2], flags[1::2]))
    options = {"--ckpt": ckpt, "--prompt": "the cat", "--out-dir": tmp_path, **given}
    got, out, err = run(capsys, *[item for pair in options.items() for item in pair])
    assert got == status
    [line] = err.splitlines()
    assert line.startswith("python -m minillm.inspect: error: ")
    assert all(fragment in line for fragment in fragments), line
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_prompt_longer_than_the_context_is_cropped_with_a_note(ckpt, tmp_path, capsys):
    prompt = TEXT[:TINY.block_size + 5]
    status, out, err = run(capsys, "--ckpt", ckpt, "--prompt", prompt, "--out-dir", tmp_path)
    assert status == 0
    [note] = err.splitlines()
    assert f"has {len(prompt)} tokens" in note and f"last {TINY.block_size}" in note
    document = json.loads((tmp_path / "inspect.json").read_text(encoding="utf-8"))
    assert "".join(document["tokens"]) == prompt[-TINY.block_size:]


def test_both_readings_give_the_same_findings(ckpt, tmp_path, capsys):
    found = {}
    for reading in ("fast", "reference"):
        flags = ["--reference"] if reading == "reference" else []
        assert run(capsys, "--ckpt", ckpt, "--prompt", "the cat sat", "--out-dir", tmp_path / reading, *flags)[0] == 0
        found[reading] = json.loads((tmp_path / reading / "inspect.json").read_text(encoding="utf-8"))
    numpy.testing.assert_allclose(found["fast"]["attention"], found["reference"]["attention"], rtol=0, atol=1e-5)
    assert [p["id"] for p in found["fast"]["next"]] == [p["id"] for p in found["reference"]["next"]]
    assert found["fast"]["mean_loss"] == pytest.approx(found["reference"]["mean_loss"], rel=1e-5)


def test_the_weights_are_kept_and_read_on_the_models_device(xp_device):
    """On a GPU the kept weights are CuPy arrays; look_inside brings them to the host (skipped without one)."""
    model, tokenizer = char_model(dtype="float32")
    ids = tokenizer.encode("the cat sat")
    on_device = GPT(TINY, device=xp_device,
                    params={n: backend.to_device(p, xp_device) for n, p in model.params.items()})
    for reference in (True, False):
        model.reference = on_device.reference = reference
        found, expected = look_inside(on_device, tokenizer, ids), look_inside(model, tokenizer, ids)
        numpy.testing.assert_allclose(found["attention"], expected["attention"], rtol=0, atol=1e-5)
        assert found["mean_loss"] == pytest.approx(expected["mean_loss"], rel=1e-5)
