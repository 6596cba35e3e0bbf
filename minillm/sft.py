"""Prompt/completion data for supervised fine-tuning, with the loss on the completions only.

A JSONL file holds one {"prompt": "...", "completion": "..."} object per line
(blank lines are skipped). Each example becomes one row of tokens:

    ids = prompt ids + completion ids + [end]     end: the end-of-text token, or a newline
                                                  for a character vocabulary
    x   = ids[:-1]                                the inputs
    y   = ids[1:], IGNORE_INDEX where the target is a prompt token

so the loss (cross-entropy's mean over the targets that are not IGNORE_INDEX) is taken
on the completion and its end token only: the model learns to answer and to stop,
not to write prompts. A batch pads its rows to the longest one, with token 0 in x and
IGNORE_INDEX in y. Every example has its own row, so no position ever attends to
another example, and the padding comes after a row's last token, where causal
attention keeps it out of every real position.
"""

from pathlib import Path

import numpy

from minillm import files, tasks
from minillm.errors import DataError
from minillm.layers.cross_entropy import IGNORE_INDEX
from minillm.tokenizers.char import UnknownCharactersError


class SFTError(DataError):
    """Prompt/completion data that cannot be read or does not fit the model."""


def read_jsonl(path):
    """[(line number, prompt, completion)] from a JSONL file; a bad line is an error naming it."""
    path = Path(path)
    hint = f"--sft takes a JSONL file or the name of a built-in task ({', '.join(tasks.TASKS)})"
    raw = files.read_regular(path, SFTError, f"a JSONL file; {hint}")
    lines = files.lines_of(files.decode_utf8(raw, path, SFTError))
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = files.parse_json(line, f"{path} line {number}", SFTError)
        if not isinstance(record, dict):
            raise SFTError(f"{path} line {number}: expected an object with \"prompt\" and \"completion\"")
        for field in ("prompt", "completion"):
            if not isinstance(record.get(field), str):
                problem = "is missing" if field not in record else "is not a string"
                raise SFTError(f"{path} line {number}: the field \"{field}\" {problem}")
        if not record["completion"]:
            raise SFTError(f"{path} line {number}: the completion is empty; there would be nothing to learn")
        examples.append((number, record["prompt"], record["completion"]))
    if len(examples) < 2:
        raise SFTError(f"{path}: {len(examples)} example(s); at least 2 are needed (one to train, one to validate)")
    return examples


def load_examples(source):
    """(examples, description): a built-in task's training split (numbered from 1), or a JSONL file's lines."""
    if source in tasks.TASKS:
        pairs = tasks.examples(source, "train")
        return [(number, *pair) for number, pair in enumerate(pairs, start=1)], f"built-in {source} task"
    return read_jsonl(source), str(source)


def corpus_text(examples):
    """All the text of the examples and the newline that ends them: a new character vocabulary's source."""
    return "".join(prompt + completion for _, prompt, completion in examples) + "\n"


def end_id(tokenizer):
    """The token that ends a completion: end-of-text, or else a newline."""
    if tokenizer.eot_id is not None:
        return tokenizer.eot_id
    try:
        return tokenizer.encode("\n")[0]
    except UnknownCharactersError:
        raise SFTError("the tokenizer has neither an end-of-text token nor a newline, "
                       "so no completion could end") from None


def encode(examples, tokenizer, block_size, source):
    """[(ids, n_prompt)]: each example's tokens (int64) and how many of them are the prompt."""
    end = end_id(tokenizer)
    rows = []
    for number, prompt, completion in examples:
        try:
            prompt_ids, completion_ids = tokenizer.encode(prompt), tokenizer.encode(completion)
        except UnknownCharactersError as err:
            raise SFTError(f"{source} line {number}: {err}") from None
        ids = numpy.array(prompt_ids + completion_ids + [end], dtype=numpy.int64)
        if len(ids) > block_size + 1:
            raise SFTError(
                f"{source} line {number}: the prompt, completion and end token are {len(ids)} tokens, more than "
                f"the {block_size + 1} a context of {block_size} trains on; shorten it or raise --block-size"
            )
        rows.append((ids, len(prompt_ids)))
    return rows


def prepare_splits(examples, tokenizer, block_size, source, val_fraction=0.1):
    """(train rows, val rows): the examples encoded, the last val_fraction of them (at least one) held out."""
    rows = encode(examples, tokenizer, block_size, source)
    n_val = max(1, int(len(rows) * val_fraction))
    return rows[:-n_val], rows[-n_val:]


def get_batch(rows, batch_size, rng):
    """batch_size random examples as x, y: see collate()."""
    return collate([rows[i] for i in rng.integers(0, len(rows), size=batch_size)])


def collate(rows):
    """Encoded examples as x (B, T) and y (B, T), int64, T the longest row's length minus one.

    y is IGNORE_INDEX on prompt targets and on padding (see the module docstring).
    """
    T = max(len(ids) for ids, _ in rows) - 1
    x = numpy.zeros((len(rows), T), dtype=numpy.int64)
    y = numpy.full((len(rows), T), IGNORE_INDEX, dtype=numpy.int64)
    for row, (ids, n_prompt) in enumerate(rows):
        n = len(ids) - 1
        x[row, :n] = ids[:-1]
        # Position t predicts ids[t + 1]: a completion (or end) token from t = n_prompt - 1 on.
        start = max(n_prompt - 1, 0)
        y[row, start:n] = ids[start + 1 :]
    return x, y
