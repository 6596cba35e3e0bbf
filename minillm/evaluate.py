"""Exact-match accuracy of a model on prompt/completion pairs.

    python -m minillm.evaluate --ckpt out-add/ckpt.npz --task addition   # the task's held-out test problems
    python -m minillm.evaluate --ckpt out-add/ckpt.npz --data test.jsonl

For each prompt the model writes greedily (temperature 0) until its end token (as
in training, see sft.py: end-of-text, or a newline for a character vocabulary), at
most one token more than the longest completion; the answer is right when that
text equals the completion exactly. Prompts of the same length run as one batch.
"""

import sys
from collections import defaultdict

from minillm import backend, checkpoint, cli, finetune, sft, tasks
from minillm.sampling import generate
from minillm.tokenizers.char import UnknownCharactersError

SHOWN_MISTAKES = 5


def answers(model, tokenizer, prompts, max_new_tokens, batch_size=256):
    """The greedy answer to each prompt: the text the model writes before its end token."""
    end = sft.end_id(tokenizer)
    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    by_length = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    result = [None] * len(prompts)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            idx = [encoded[i] for i in chunk]
            out = backend.to_host(generate(model, idx, max_new_tokens, temperature=0.0))
            for i, row in zip(chunk, out[:, len(idx[0]) :].tolist()):
                result[i] = tokenizer.decode(row[: row.index(end)] if end in row else row)
    return result


def exact_match(model, tokenizer, pairs):
    """(number right, [(prompt, completion, answer)] of the wrong ones) over (prompt, completion) pairs."""
    max_new_tokens = max(len(tokenizer.encode(completion)) for _, completion in pairs) + 1
    given = answers(model, tokenizer, [prompt for prompt, _ in pairs], max_new_tokens)
    wrong = [(prompt, completion, answer) for (prompt, completion), answer in zip(pairs, given) if answer != completion]
    return len(pairs) - len(wrong), wrong


def parse_args(argv):
    parser = cli.ArgumentParser(prog="python -m minillm.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="out/ckpt.npz", metavar="PATH", help="checkpoint (default: out/ckpt.npz)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", choices=tasks.TASKS, help="a built-in task's held-out test problems")
    source.add_argument("--data", metavar="PATH", help='a JSONL file of {"prompt": ..., "completion": ...} lines')
    parser.add_argument("--device", default="auto", choices=backend.DEVICES, help="cpu, cuda or auto (default: auto)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    return cli.run("evaluate", lambda: report(args))


def report(args):
    """Load the model and the pairs, and print the exact-match accuracy and the first mistakes."""
    model, tokenizer, _, _ = checkpoint.load(args.ckpt, device=backend.resolve_device(args.device))
    model = finetune.merged(model).eval()  # LoRA adapters merged: the same logits, no adapter work at each token
    if args.task:
        pairs, described = tasks.examples(args.task, "test"), f"held-out {args.task} problems"
    else:
        pairs, described = [(p, c) for _, p, c in sft.read_jsonl(args.data)], args.data
    try:
        right, wrong = exact_match(model, tokenizer, pairs)
    except UnknownCharactersError as err:
        raise UnknownCharactersError(f"cannot encode a prompt: {err}") from None
    print(f"exact match: {right:,} / {len(pairs):,} = {100 * right / len(pairs):.1f}% ({described})")
    for prompt, completion, answer in wrong[:SHOWN_MISTAKES]:
        print(f"  {prompt!r}: expected {completion!r}, got {answer!r}")


if __name__ == "__main__":
    sys.exit(main())
