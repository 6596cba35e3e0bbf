"""N samples as one batch are the N samples drawn one at a time, each with its own seed.

Row i of a batch draws from a generator seeded seed + i (sampling.RowGenerators), so it samples
what a batch of one with seed + i samples: greedy or sampled, with the cache or without, across the
window's slide, and generate.py's texts with their stop texts and end-of-text token. In float64 the
tokens are equal exactly; in float32 a batch's matrix products round differently from a single
row's (BLAS's matrix-matrix kernel against its matrix-vector one), so tokens may part at a near-tie.
"""

import argparse

import numpy
import pytest
from helpers import random_tokens, tiny_model

from minillm import backend, checkpoint, generate_cli
from minillm.model import GPT, GPTConfig
from minillm.sampling import RowGenerators, generate
from minillm.tokenizers.char import CharTokenizer

OPTIONS = {
    "greedy": dict(temperature=0),
    "temperature": dict(temperature=1.0),
    "top-k": dict(temperature=0.8, top_k=3),
    "top-p": dict(temperature=1.2, top_p=0.8),
    "top-k and top-p": dict(temperature=0.7, top_k=4, top_p=0.9),
}


def test_each_row_draws_what_a_generator_of_its_own_seed_draws():
    rows = RowGenerators(7, 3)
    alone = [backend.RNG(7 + i) for i in range(3)]
    for shape in [(3, 5), (3, 2), (3, 5)]:
        drawn = rows.uniform(shape, numpy.float32)
        assert drawn.shape == shape and drawn.dtype == numpy.float32
        for row, rng in zip(drawn, alone):
            numpy.testing.assert_array_equal(row, rng.uniform(shape[1:], numpy.float32))


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_a_batch_samples_what_each_row_samples_alone(options, use_cache):
    model = tiny_model("float64", vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)
    prompts = random_tokens(11, (4, 3), seed=1)
    new_tokens = 9  # past block_size: the window slides, and the cache is rebuilt each step
    batch = generate(model, prompts, new_tokens, seed=20, use_cache=use_cache, **options)
    alone = [generate(model, prompts[i : i + 1], new_tokens, seed=20 + i, use_cache=use_cache, **options)[0]
             for i in range(len(prompts))]
    numpy.testing.assert_array_equal(batch, numpy.stack(alone))


def test_rows_of_one_prompt_draw_different_samples_and_the_first_is_the_seeds_own():
    model = tiny_model("float64", vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)
    prompts = numpy.zeros((4, 1), dtype=numpy.int64)
    batch = generate(model, prompts, 12, temperature=1.0, seed=3)
    assert len({tuple(row) for row in batch.tolist()}) > 1
    numpy.testing.assert_array_equal(batch[0], generate(model, prompts[:1], 12, temperature=1.0, seed=3)[0])


def test_float32_greedy_rows_part_from_the_single_runs_only_at_a_near_tie():
    model = tiny_model("float32", vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
    prompts = random_tokens(50, (6, 2), seed=2)
    batch = generate(model, prompts, 20, temperature=0)
    for prompt, row in zip(prompts, batch):
        alone = generate(model, prompt[None], 20, temperature=0)[0]
        differ = numpy.flatnonzero(row != alone)
        if differ.size:
            context = alone[None, : differ[0]][:, -model.config.block_size :]
            top_two = numpy.sort(model(context)[0][0, -1])[-2:]
            assert top_two[1] - top_two[0] < 1e-4 * max(1.0, abs(float(top_two[1])))


def samples_printed(capsys, model, tokenizer, num_samples, seed, stop):
    """The texts generate.py prints for these samples, each with its prompt."""
    args = argparse.Namespace(prompt="ab", num_samples=num_samples, max_new_tokens=40, temperature=1.0, top_k=None,
                              top_p=None, seed=seed, stop=stop)
    capsys.readouterr()
    generate_cli.print_samples(model, tokenizer, tokenizer.encode(args.prompt), args)
    return capsys.readouterr().out.removesuffix("\n").split("\n" + generate_cli.SEPARATOR + "\n")


@pytest.mark.parametrize("stop", [[], ["ca"]], ids=["end-of-text only", "and a stop text"])
def test_printed_samples_of_a_batch_are_those_of_one_sample_runs(capsys, stop):
    tokenizer = CharTokenizer.from_text("abcdefg")
    tokenizer.eot_id = tokenizer.encode("g")[0]  # a character-level vocabulary with an end-of-text token
    model = tiny_model("float64", vocab_size=tokenizer.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8)
    batch = samples_printed(capsys, model, tokenizer, 5, 3, stop)
    alone = [samples_printed(capsys, model, tokenizer, 1, 3 + i, stop)[0] for i in range(5)]
    assert batch == alone
    assert len(set(batch)) > 1
    assert any(len(text) < len("ab") + 40 for text in batch)  # some sample ended early


def test_generate_py_prints_for_each_seed_the_text_of_one_sample_with_it(capsys, tmp_path):
    tokenizer = CharTokenizer.from_text("the quick brown fox jumps over the lazy dog\n")
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=8, n_layer=2, n_head=2, n_embd=16), seed=3)
    checkpoint.save(tmp_path / "ckpt.npz", model, tokenizer)

    def printed(num_samples, seed):
        argv = ["--ckpt", str(tmp_path / "ckpt.npz"), "--prompt", "the ", "--num-samples", str(num_samples),
                "--seed", str(seed), "--stop", "o", "--max-new-tokens", "60", "--device", "cpu"]
        capsys.readouterr()
        assert generate_cli.main(argv) == 0
        return capsys.readouterr().out.removesuffix("\n").split("\n" + generate_cli.SEPARATOR + "\n")

    assert printed(3, 5) == [printed(1, seed)[0] for seed in (5, 6, 7)]
