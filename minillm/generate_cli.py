"""The command line of generate.py: prompt, sampling options, streaming output, one-line errors."""

import re
import sys
from pathlib import Path

from minillm import backend, checkpoint, cli, files, memory
from minillm.errors import ConfigError
from minillm.sampling import argument_text, encode_prompt, option_problem, stream
from minillm.tokenizers.char import UnknownCharactersError

SEPARATOR = "-" * 40
PROMPT_LIMIT = 16 * files.MiB  # far beyond any context; a longer "prompt" is the wrong file


class SampleText:
    """One sample's generated text as it grows, until a stop text or the end-of-text token.

    stops: texts that end the sample right after them; eot_id: the end-of-text token id, or None.
    """

    def __init__(self, tokenizer, stops, eot_id):
        self.tokenizer, self.stops, self.eot_id = tokenizer, stops, eot_id
        self.text = ""
        self.done = False
        self.pending = []  # ids that may end inside a character (byte-level BPE splits UTF-8)

    def add(self, token):
        """Take the next token id; return the text it adds (nothing once the sample is done)."""
        if self.done:
            return ""
        if token == self.eot_id:
            self.done = True
            return self.flush()
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending)
        # A UTF-8 character has at most 4 bytes: wait for the rest of one that is cut short.
        if piece.endswith("\ufffd") and len(self.pending) < 4:
            return ""
        self.pending = []
        return self.extend(piece)

    def flush(self):
        """The text of ids still held back (at the end of the sample), replacement characters and all."""
        piece = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return self.extend(piece)

    def extend(self, piece):
        """Append a piece of text, cut it after a stop text, and return what was appended."""
        start = len(self.text)
        self.text += piece
        # Search only where a stop text could end inside the new piece.
        ends = [
            found + len(stop)
            for stop in self.stops
            if (found := self.text.find(stop, max(0, start - len(stop) + 1))) >= 0
        ]
        if ends:
            self.text = self.text[: min(ends)]
            self.done = True
        return self.text[start:]


def parse_args(argv=None):
    parser = cli.ArgumentParser(
        prog="generate.py",
        description="Sample text from a trained checkpoint. The text streams to standard output as it is "
        "produced. Several samples are drawn as one batch: the first streams live, the others follow when "
        "the batch is done, each after a line of dashes. Each is the text that one sample alone would give "
        "with its seed (see --seed).",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--ckpt", default=None, metavar="PATH", help="checkpoint file (default: OUT_DIR/ckpt.npz)")
    where.add_argument("--out-dir", default="out", metavar="DIR",
                       help="folder of the checkpoint written by train.py (default: out)")
    where.add_argument("--init-from", default=None, metavar="DIR",
                       help="a Hugging Face GPT-2 directory instead: config.json, model.safetensors, "
                       "vocab.json and merges.txt")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", metavar="TEXT",
                        help="text to continue; - reads standard input, less one final newline (default: empty, "
                        "which starts from a newline token, or token 0 when the vocabulary has no newline)")
    prompt.add_argument("--prompt-file", default=None, metavar="PATH",
                        help="read the prompt from this UTF-8 file, less one final newline; - is standard input")
    parser.add_argument("--num-samples", type=int, default=1, metavar="N",
                        help="samples, generated as one batch (default: 1)")
    parser.add_argument("--max-new-tokens", type=int, default=500, metavar="N",
                        help="tokens to add to the prompt (default: 500)")
    parser.add_argument("--temperature", type=float, default=0.8, metavar="T",
                        help="0 is greedy; higher is more random (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K",
                        help="sample only among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, metavar="P",
                        help="sample only among the fewest most likely tokens whose probability reaches p, 0 < p <= 1")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", type=unescape,
                        help="end a sample right after it produces TEXT, in which \\n, \\t and \\\\ stand for a "
                        "newline, a tab and a backslash (may be given more than once; the end-of-text token, for "
                        "tokenizers that have one, always ends a sample)")
    parser.add_argument("--seed", type=int, default=1337, metavar="N",
                        help="same seed, same text; of several samples, the first takes seed N, the next N + 1, "
                        "and so on (default: 1337)")
    parser.add_argument("--device", default="auto", choices=backend.DEVICES, help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--reference", action="store_true",
                        help="sample on the reference layers (minillm/layers: the equations as written) "
                             "instead of the fast ones")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    for name in ("num_samples", "max_new_tokens"):
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.seed < 0:
        parser.error(f"--seed must be 0 or more, got {args.seed}")
    problem = option_problem(args.temperature, args.top_k, args.top_p)
    if problem:
        name, what = problem
        parser.error(f"--{name.replace('_', '-')} {what}")
    if "" in args.stop:
        parser.error("--stop must not be empty")
    for name in ("ckpt", "out_dir", "init_from", "prompt_file"):
        if getattr(args, name) == "":
            parser.error(f"--{name.replace('_', '-')} is empty: give a path, or leave the option out")
    flag = "--prompt" if args.prompt_file is None else "--prompt-file"
    try:
        args.prompt = read_prompt(args)
    except ConfigError as err:
        parser.error(str(err))
    except OSError as err:
        parser.error(f"{flag}: cannot read standard input ({err.strerror or err})")
    return args


def read_prompt(args):
    """The prompt text from --prompt, --prompt-file, or standard input (either one given as -).

    A --prompt is read as UTF-8 (see argument_text): bytes that are not UTF-8 are a usage
    error, not lone surrogates for the tokenizer. One final newline of a file or of
    standard input is dropped: `echo` and text editors add it, and the model would
    otherwise continue after a line break.
    """
    if args.prompt_file is None and args.prompt != "-":
        return argument_text(args.prompt, "--prompt", ConfigError)
    if args.prompt_file in (None, "-"):
        raw = sys.stdin.buffer.read(PROMPT_LIMIT + 1)
        if len(raw) > PROMPT_LIMIT:
            raise ConfigError(f"standard input: more than the {PROMPT_LIMIT:,} bytes a prompt may have")
        text = files.decode_utf8(raw, "standard input", ConfigError)
    else:
        text = files.read_small_text(args.prompt_file, ConfigError, PROMPT_LIMIT, "a UTF-8 prompt file (--prompt-file)")
    # Lines ended "\r\n" (a file saved on Windows) end "\n", as they do in a --prompt or a file saved elsewhere.
    return text.replace("\r\n", "\n").removesuffix("\n")


def unescape(text):
    """--stop's TEXT with \\n, \\t and \\\\ made a newline, a tab and a backslash (a shell passes them as typed)."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m[1]], text)


def main(argv=None):
    args = parse_args(argv)
    if sys.stdout is None:  # started with it closed (`>&-`)
        print("generate.py: error: standard output is closed, so the samples have nowhere to go; "
              "redirect it to a file instead", file=sys.stderr)
        return cli.FAILED
    return cli.run("generate.py", lambda: sample(args), args.debug)


def sample(args):
    """Load the model, encode the prompt, print the samples."""
    model, tokenizer = load_model(args)
    model.reference = args.reference
    try:
        prompt_ids = encode_prompt(tokenizer, args.prompt)
    except UnknownCharactersError as err:
        raise UnknownCharactersError(
            f"cannot encode the prompt: {err}; a character-level model knows only the characters of its "
            "training text: leave them out, or use a model with a BPE tokenizer, which encodes any text"
        ) from None
    check_memory(model, len(prompt_ids), args.num_samples)
    if backend.auto_missed_a_gpu(args.device, model.device):
        print("generate.py: note: CuPy is installed but sees no CUDA GPU; sampling on the CPU", file=sys.stderr)
    if len(prompt_ids) > model.config.block_size:
        print(f"generate.py: note: the prompt has {len(prompt_ids)} tokens; the model sees only the last "
              f"{model.config.block_size} (its context)", file=sys.stderr)
    print_samples(model, tokenizer, prompt_ids, args)


def check_memory(model, prompt_length, num_samples):
    """ConfigError, before sampling, when the batch of samples cannot fit: its KV cache, the prompt's pass."""
    itemsize, config = model.dtype.itemsize, model.config
    need = memory.kv_cache_bytes(config, num_samples, itemsize) + memory.forward_bytes(
        config, num_samples, min(prompt_length, config.block_size), itemsize
    )
    memory.check_fits(need, f"--num-samples {num_samples} (sampled as one batch)", "ask for fewer samples")


def print_samples(model, tokenizer, prompt_ids, args):
    """Stream the first sample to stdout as it is produced; print the others when the batch is done."""
    samples = [SampleText(tokenizer, args.stop, tokenizer.eot_id) for _ in range(args.num_samples)]
    print(args.prompt, end="", flush=True)
    steps = stream(model, [prompt_ids] * args.num_samples, args.max_new_tokens,
                   args.temperature, args.top_k, args.top_p, args.seed)
    for next_ids in steps:
        # The one device-to-host copy of a step: the ids the text is made of.
        pieces = [sample.add(int(token)) for sample, token in zip(samples, backend.to_host(next_ids))]
        print(pieces[0], end="", flush=True)
        if all(sample.done for sample in samples):
            break
    print(samples[0].flush())
    for sample in samples[1:]:
        sample.flush()
        print(SEPARATOR)
        print(args.prompt + sample.text)


def load_model(args):
    """(model, tokenizer) from --init-from, --ckpt, or the out dir's best checkpoint."""
    device = backend.resolve_device(args.device)
    if args.init_from:
        return checkpoint.load_pretrained(args.init_from, device=device)
    ckpt = Path(args.ckpt) if args.ckpt else Path(args.out_dir) / "ckpt.npz"
    return checkpoint.load_merged(ckpt, device, "--ckpt PATH, --out-dir DIR or --init-from GPT2_DIR")
