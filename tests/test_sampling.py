"""Sampling: the KV cache changes nothing but the speed; the sampling controls keep what they promise.

- attention (reference and fast) and the model with a KV cache give the full forward's outputs (float64, 1e-12);
- greedy decoding with the cache gives exactly the tokens without it, across the block_size crop;
- top-k keeps exactly k tokens (ties included), top-p the smallest set reaching p;
- samples follow softmax(logits / T); a tiny temperature is greedy; a seed fixes the sample;
- generate.py streams text, honours --stop, reads prompts from files and stdin, and
  rejects bad input with one line and no traceback.
"""

import subprocess
import sys
from pathlib import Path

import numpy
import pytest
from hypothesis import assume, given, settings, strategies as st

import minillm.fast
import minillm.layers
from minillm import backend, checkpoint, hf
from minillm.generate_cli import SampleText
from minillm.layers import embedding
from minillm.model import GPT, GPTConfig
from minillm.sampling import encode_prompt, generate, keep_top_k, keep_top_p, sample_next, stream
from minillm.tokenizers.char import CharTokenizer

GENERATE = Path(__file__).resolve().parents[1] / "generate.py"
FAST = settings(max_examples=40, deadline=None)


def max_relative_error(a, b):
    return float(numpy.abs(a - b).max() / max(numpy.abs(b).max(), 1e-300))


def spread_model(config, dtype, seed=0):
    """A GPT with weights ~ N(0, 0.5^2): GPT-2's small init makes logits nearly equal, these rarely tie."""
    model = GPT(config, dtype=dtype).eval()
    rng = numpy.random.default_rng(seed)
    for p in model.params.values():
        p[...] = rng.normal(0.0, 0.5, p.shape)
    return model


@st.composite
def small_models(draw, dtype):
    n_head = draw(st.integers(1, 2))
    config = GPTConfig(
        vocab_size=draw(st.integers(2, 12)), block_size=draw(st.integers(2, 8)), n_layer=draw(st.integers(1, 2)),
        n_head=n_head, n_embd=n_head * draw(st.integers(1, 4)), bias=draw(st.booleans()),
    )
    return spread_model(config, dtype, draw(st.integers(0, 2**16)))


SMALL = GPTConfig(vocab_size=10, block_size=5, n_layer=2, n_head=2, n_embd=8)


def random_tokens(model, shape, seed=0):
    return numpy.random.default_rng(seed).integers(0, model.config.vocab_size, shape)


# ---------------------------------------------------------------- the KV cache


@pytest.mark.parametrize("attention", [minillm.layers.attention, minillm.fast.attention], ids=["reference", "fast"])
@FAST
@given(
    B=st.integers(1, 2), n_head=st.integers(1, 3), hs=st.integers(1, 4), T=st.integers(1, 9),
    cuts=st.lists(st.integers(1, 8), max_size=4), seed=st.integers(0, 2**16),
)
def test_attention_in_chunks_with_a_cache_equals_the_full_forward(attention, B, n_head, hs, T, cuts, seed):
    rng = numpy.random.default_rng(seed)
    C = n_head * hs
    x = rng.normal(size=(B, T, C))
    weights = rng.normal(size=(C, 3 * C)), rng.normal(size=3 * C), rng.normal(size=(C, C)), rng.normal(size=C)
    full, _ = attention.forward(x, *weights, n_head)

    kv_cache = attention.KVCache(B, n_head, T, hs, x.dtype, numpy)
    bounds = sorted({0, T, *(c for c in cuts if c < T)})
    chunks = [attention.forward(x[:, a:b], *weights, n_head, kv_cache=kv_cache) for a, b in zip(bounds, bounds[1:])]
    assert all(cache is None for _, cache in chunks)  # inference only: nothing kept for backward
    assert kv_cache.length == T
    assert max_relative_error(numpy.concatenate([out for out, _ in chunks], axis=1), full) < 1e-12


@FAST
@given(model=small_models("float64"), data=st.data())
def test_decode_logits_equal_the_full_forward_last_position(model, data):
    block_size = model.config.block_size
    B = data.draw(st.integers(1, 3))
    prompt_len = data.draw(st.integers(1, block_size))
    tokens = random_tokens(model, (B, block_size), data.draw(st.integers(0, 2**16)))

    kv_cache = model.new_kv_cache(B)
    logits = model.decode(tokens[:, :prompt_len], kv_cache)
    for t in range(prompt_len, block_size + 1):
        full, _ = model(tokens[:, :t])
        assert logits.shape == (B, model.config.vocab_size)
        assert max_relative_error(logits, full[:, -1]) < 1e-12
        if t < block_size:
            logits = model.decode(tokens[:, t : t + 1], kv_cache)


def test_decode_past_block_size_is_refused_and_float32_stays_float32():
    model = GPT(GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4)).eval()
    kv_cache = model.new_kv_cache(1)
    logits = model.decode(numpy.zeros((1, 4), dtype=numpy.int64), kv_cache)
    assert logits.dtype == kv_cache[0].k.dtype == numpy.float32
    with pytest.raises(embedding.TokenIdError, match="block_size 4"):
        model.decode(numpy.zeros((1, 1), dtype=numpy.int64), kv_cache)


def assert_same_greedy_tokens(model, prompt, max_new_tokens):
    """Cached and uncached greedy tokens agree; in float32 a split is allowed only at a near-tie."""
    cached = generate(model, prompt, max_new_tokens, temperature=0)
    uncached = generate(model, prompt, max_new_tokens, temperature=0, use_cache=False)
    assert cached.shape == uncached.shape == (prompt.shape[0], prompt.shape[1] + max_new_tokens)
    if model.dtype == numpy.float64:
        numpy.testing.assert_array_equal(cached, uncached)
        return
    for row_cached, row_uncached in zip(cached, uncached):
        differ = numpy.flatnonzero(row_cached != row_uncached)
        if differ.size:
            context = row_uncached[None, : differ[0]][:, -model.config.block_size :]
            top_two = numpy.sort(model(context)[0][0, -1])[-2:]
            assert top_two[1] - top_two[0] < 1e-4 * max(1.0, abs(float(top_two[1])))


@FAST
@given(dtype=st.sampled_from(["float64", "float32"]), data=st.data())
def test_greedy_with_the_cache_gives_the_tokens_of_greedy_without_it(dtype, data):
    model = data.draw(small_models(dtype))
    block_size = model.config.block_size
    prompt_len = data.draw(st.integers(1, block_size))
    # Past block_size the window slides and the cache is rebuilt: the totals cross it.
    max_new_tokens = block_size - prompt_len + data.draw(st.integers(1, block_size + 2))
    prompt = random_tokens(model, (data.draw(st.integers(1, 3)), prompt_len), data.draw(st.integers(0, 2**16)))
    assert_same_greedy_tokens(model, prompt, max_new_tokens)


def test_a_prompt_longer_than_block_size_is_cropped_alike_with_and_without_the_cache():
    model = spread_model(SMALL, "float64")
    assert_same_greedy_tokens(model, random_tokens(model, (2, 3 * model.config.block_size)), 5)


# ---------------------------------------------------------------- top-k, top-p, temperature


@settings(max_examples=100, deadline=None)
@given(data=st.data(), dtype=st.sampled_from([numpy.float32, numpy.float64]))
def test_top_k_keeps_exactly_k_largest_and_breaks_ties_by_lowest_id(data, dtype):
    B, V = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 10))
    values = data.draw(st.lists(st.integers(-2, 2), min_size=B * V, max_size=B * V))  # few values: many ties
    logits = numpy.array(values, dtype=dtype).reshape(B, V)
    k = data.draw(st.integers(1, V + 2))
    kept = keep_top_k(logits, k)
    assert kept.dtype == dtype
    for row, kept_row in zip(logits, kept):
        expected = numpy.zeros(V, dtype=bool)
        expected[numpy.argsort(-row, kind="stable")[:k]] = True  # largest first, ties by lower id
        numpy.testing.assert_array_equal(numpy.isfinite(kept_row), expected)
        numpy.testing.assert_array_equal(kept_row[expected], row[expected])


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_top_p_keeps_the_smallest_most_likely_set_that_reaches_p(data):
    B, V = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 10))
    logits = numpy.array(
        data.draw(st.lists(st.floats(-4, 4), min_size=B * V, max_size=B * V)), dtype=numpy.float64
    ).reshape(B, V)
    p = data.draw(st.floats(0.01, 1.0))
    kept = keep_top_p(logits, p)
    for row, kept_row in zip(logits, kept):
        probs = numpy.exp(row - row.max())
        probs /= probs.sum()
        order = numpy.argsort(-probs, kind="stable")
        reach = numpy.cumsum(probs[order])
        assume(numpy.abs(reach - p).min() > 1e-9)  # no rounding question at the boundary
        n = int(numpy.argmax(reach >= p)) + 1 if reach[-1] >= p else V
        expected = numpy.zeros(V, dtype=bool)
        expected[order[:n]] = True
        numpy.testing.assert_array_equal(numpy.isfinite(kept_row), expected)
        assert probs[expected].sum() >= p - 1e-9  # it reaches p ...
        assert probs[expected].sum() - probs[expected].min() < p  # ... and no smaller set of the same kind does
    assert keep_top_p(logits.astype(numpy.float32), p).dtype == numpy.float32


@settings(max_examples=50, deadline=None)
@given(
    logits=st.lists(st.floats(-5, 5), min_size=2, max_size=12).map(lambda v: numpy.array([v], dtype=numpy.float32)),
    seed=st.integers(0, 2**16),
)
def test_a_tiny_temperature_is_greedy(logits, seed):
    top_two = numpy.sort(logits[0])[-2:]
    assume(top_two[1] - top_two[0] > 1e-3)
    rng = backend.RNG(seed)
    for top_k, top_p in [(None, None), (3, None), (None, 0.5)]:
        assert sample_next(logits, 1e-6, top_k, top_p, rng)[0] == logits[0].argmax()
    assert sample_next(logits, 0, None, None, rng)[0] == logits[0].argmax()


def expected_distribution(logits, temperature, top_k, top_p):
    """softmax(logits / T) restricted to top-k, then to top-p, in float64, by plain sorting."""
    probs = numpy.exp((logits - logits.max()) / temperature)
    order = numpy.argsort(-probs, kind="stable")
    if top_k is not None:
        probs[order[top_k:]] = 0.0
    probs /= probs.sum()
    if top_p is not None:
        n = int(numpy.argmax(numpy.cumsum(probs[order]) >= top_p)) + 1
        probs[order[n:]] = 0.0
        probs /= probs.sum()
    return probs


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, None, None), (2.5, 3, None),
                                                        (1.0, None, 0.8), (0.7, 4, 0.7)])
def test_sample_frequencies_match_softmax_over_temperature(dtype, temperature, top_k, top_p):
    logits = numpy.array([2.0, 1.0, 0.5, -1.0, 0.0, 1.5], dtype=dtype)
    n = 40_000
    ids = sample_next(numpy.tile(logits, (n, 1)), temperature, top_k, top_p, backend.RNG(7))
    frequencies = numpy.bincount(ids, minlength=logits.size) / n
    probs = expected_distribution(logits.astype(numpy.float64), temperature, top_k, top_p)
    # Each frequency is a mean of n Bernoulli(p) draws: allow 5 standard deviations.
    tolerance = 5 * numpy.sqrt(probs * (1 - probs) / n)
    assert numpy.all(numpy.abs(frequencies - probs) <= tolerance), (frequencies, probs)
    assert numpy.all(frequencies[probs == 0] == 0)


# ---------------------------------------------------------------- generate() and stream()


def test_same_seed_same_sample_other_seed_other_sample():
    model = spread_model(SMALL, "float32")
    prompt = random_tokens(model, (2, 1))
    first, again, other = (generate(model, prompt, 40, temperature=1.0, seed=s) for s in (1, 1, 2))
    numpy.testing.assert_array_equal(first, again)
    assert not numpy.array_equal(first, other)
    numpy.testing.assert_array_equal(first, generate(model, prompt, 40, temperature=1.0, seed=1, use_cache=False))


def test_generate_as_training_calls_it():
    model = GPT(GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=4))
    out = generate(model, numpy.array([[3]]), 10, temperature=0.8, top_k=None, seed=5)
    assert out.shape == (1, 11) and out[0, 0] == 3 and out.dtype.kind == "i"
    assert 0 <= out.min() and out.max() < 7
    assert model.training  # restored after sampling in eval mode
    numpy.testing.assert_array_equal(generate(model, numpy.array([[3, 4]], dtype=numpy.uint16), 0), [[3, 4]])


@pytest.mark.parametrize(
    "options, message",
    [({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p"),
     ({"top_p": 1.5}, "top_p"), ({"temperature": float("nan")}, "temperature")],
)
def test_generate_rejects_options_out_of_range(options, message):
    model = GPT(GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=4))
    with pytest.raises(ValueError, match=message):
        generate(model, numpy.array([[1]]), 3, **options)


def test_stream_rejects_a_bad_prompt_and_can_stop_early():
    model = GPT(GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=4))
    with pytest.raises(embedding.TokenIdError):
        next(stream(model, numpy.array([[7]]), 3))
    with pytest.raises(ValueError, match="at least one token"):
        next(stream(model, numpy.zeros((1, 0), dtype=numpy.int64), 3))
    steps = stream(model, numpy.array([[1, 2]]), 100)
    first = next(steps)
    assert first.shape == (1,) and not model.training
    steps.close()
    assert model.training


# ---------------------------------------------------------------- the text of a sample


def test_sample_text_ends_at_the_first_stop_even_across_tokens():
    tokenizer = CharTokenizer.from_text("abcd")
    sample = SampleText(tokenizer, ["cd", "dd"], eot_id=None)
    printed = [sample.add(i) for i in tokenizer.encode("abcddd")]
    assert printed == ["a", "b", "c", "d", "", ""] and sample.text == "abcd" and sample.done


def test_sample_text_ends_at_the_end_of_text_token_without_printing_it():
    tokenizer = CharTokenizer.from_text("abcd")
    sample = SampleText(tokenizer, [], eot_id=3)
    assert [sample.add(i) for i in (0, 1, 3, 0)] == ["a", "b", "", ""] and sample.text == "ab"


def test_an_empty_prompt_starts_from_a_newline_or_token_zero():
    assert encode_prompt(CharTokenizer("ab\n"), "") == [2]
    assert encode_prompt(CharTokenizer("xyz"), "") == [0]


# ---------------------------------------------------------------- generate.py end to end

TEXT = "the quick brown fox jumps over the lazy dog\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tokenizer = CharTokenizer.from_text(TEXT)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=8, n_layer=2, n_head=2, n_embd=16), seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.npz"
    checkpoint.save(path, model, tokenizer)
    return path


def run(*args, stdin=None, cwd=None):
    return subprocess.run(
        [sys.executable, str(GENERATE), *args], input=stdin, capture_output=True, text=True, cwd=cwd, timeout=60
    )


def test_prints_the_prompt_and_its_continuation(ckpt):
    done = run("--ckpt", str(ckpt), "--prompt", "the ", "--max-new-tokens", "30", "--seed", "3", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("the ") and len(done.stdout) == len("the ") + 30 + 1  # and a final newline
    assert set(done.stdout) <= set(TEXT)


def test_default_checkpoint_and_empty_prompt(ckpt, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ckpt.npz").write_bytes(ckpt.read_bytes())
    done = run("--max-new-tokens", "12", "--temperature", "0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout) == 12 + 1


def test_stop_ends_every_sample_right_after_the_stop_text(ckpt):
    done = run("--ckpt", str(ckpt), "--prompt", "the ", "--max-new-tokens", "400", "--num-samples", "3",
               "--stop", "o", "--seed", "1")
    assert done.returncode == 0, done.stderr
    samples = done.stdout.rstrip("\n").split("\n" + "-" * 40 + "\n")
    assert len(samples) == 3
    for sample in samples:
        generated = sample.removeprefix("the ")
        assert generated.endswith("o") and generated.count("o") == 1 and len(generated) < 400


def test_prompt_from_a_file_or_standard_input_equals_prompt_text(ckpt, tmp_path):
    prompt = "lazy dog\nthe"
    (tmp_path / "prompt.txt").write_text(prompt, encoding="utf-8")
    common = ["--ckpt", str(ckpt), "--max-new-tokens", "20", "--seed", "4"]
    outputs = [
        run(*common, "--prompt", prompt),
        run(*common, "--prompt-file", str(tmp_path / "prompt.txt")),
        run(*common, "--prompt-file", "-", stdin=prompt),
        run(*common, "--prompt", "-", stdin=prompt),
    ]
    assert all(done.returncode == 0 for done in outputs), [done.stderr for done in outputs]
    assert outputs[0].stdout.startswith(prompt)
    assert len({done.stdout for done in outputs}) == 1


@pytest.mark.parametrize(
    "args, flag",
    [(["--temperature", "-1"], "--temperature"), (["--top-k", "0"], "--top-k"), (["--top-p", "0"], "--top-p"),
     (["--top-p", "1.5"], "--top-p"), (["--max-new-tokens", "0"], "--max-new-tokens"),
     (["--prompt-file", "no/such/file.txt"], "--prompt-file")],
)
def test_bad_options_exit_2_naming_the_flag(ckpt, args, flag):
    done = run("--ckpt", str(ckpt), *args)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert flag in done.stderr.strip().splitlines()[-1]


def test_unknown_characters_are_named_and_a_bpe_model_suggested(ckpt):
    done = run("--ckpt", str(ckpt), "--prompt", "the café")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "'é'" in done.stderr and "BPE" in done.stderr


def test_a_missing_checkpoint_is_one_line_and_exit_1(tmp_path):
    done = run("--out-dir", str(tmp_path / "nothing"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "ckpt.npz" in done.stderr


def test_streamed_text_never_splits_a_character_of_byte_level_bpe():
    from minillm.tokenizers.bpe import BPETokenizer

    tokenizer = BPETokenizer.train("plain text", 260)  # merges only ASCII: "☃" stays 3 byte tokens
    ids = tokenizer.encode("a☃b")
    sample = SampleText(tokenizer, [], tokenizer.eot_id)
    pieces = [sample.add(i) for i in ids]
    assert "\ufffd" not in "".join(pieces) and "".join(pieces) == "a☃b"
    cut = SampleText(tokenizer, [], tokenizer.eot_id)
    assert [cut.add(i) for i in tokenizer.encode("☃")[:2]] == ["", ""]
    assert cut.flush() == tokenizer.decode(tokenizer.encode("☃")[:2])  # ends cut short: replacement shown


def test_generate_from_a_gpt2_directory(tmp_path):
    from minillm.tokenizers.bpe import BPETokenizer

    tokenizer = BPETokenizer.train("some text for a tiny tokenizer", 270)
    hf.save_pretrained(GPT(GPTConfig(tokenizer.vocab_size, 16, 1, 2, 8)), tmp_path, tokenizer)
    result = subprocess.run(
        [sys.executable, str(GENERATE), "--init-from", str(tmp_path), "--prompt", "some ☃", "--max-new-tokens", "5"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("some ☃")
    missing = subprocess.run([sys.executable, str(GENERATE), "--init-from", str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
