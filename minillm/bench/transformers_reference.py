"""Hugging Face transformers' GPT-2 sampling, for side-by-side timing (transformers is optional, never required).

It runs in a process of its own, with PyTorch's own thread settings, as a
transformers user's sampling would:

    python -m minillm.bench.transformers_reference GPT2_DIR NEW_TOKENS

loads the GPT-2 directory (written by minillm's save_pretrained, so both sides
hold the same weights), warms up and says "ready", then for each line it reads
runs one greedy `generate` with its KV cache, batch 1, from the one-token prompt
[0], and answers with the seconds it took and the tokens it chose.
TransformersProcess drives it.
"""

import subprocess
import sys
import time


class TransformersProcess:
    """A transformers sampling process; run() draws one sample in it: (seconds, token ids)."""

    def __init__(self, directory, new_tokens):
        command = [sys.executable, "-m", "minillm.bench.transformers_reference", str(directory), str(new_tokens)]
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        # Loading PyTorch takes seconds of CPU: wait for it, or it would run beside the first timings.
        if self._process.stdout.readline().strip() != "ready":
            raise RuntimeError("the transformers benchmark process did not start")

    def run(self):
        self._process.stdin.write("run\n")
        self._process.stdin.flush()
        answer = self._process.stdout.readline().split()
        if not answer:
            raise RuntimeError("the transformers benchmark process ended unexpectedly")
        return float(answer[0]), [int(token) for token in answer[1:]]

    def close(self):
        self._process.stdin.close()
        self._process.wait()


def serve(directory, new_tokens):
    import torch
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model = GPT2LMHeadModel.from_pretrained(directory).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long)

    def sample(tokens):
        # The attention mask is given: left to itself, generate() takes token 0 for padding and masks it.
        with torch.no_grad():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
                                  max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)

    sample(4)  # warm-up
    print("ready", flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        tokens = sample(new_tokens)
        seconds = time.perf_counter() - start
        print(seconds, *tokens[0, 1:].tolist(), flush=True)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
