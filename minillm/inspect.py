"""Look inside a model: what each attention head looks at, and what the model expected at each position.

    python -m minillm.inspect --ckpt out/ckpt.npz --prompt "def main():" --out-dir inspect

reads the prompt with the model once and writes, into the out dir,
    attention.png     for every layer and head, the attention weights over the prompt's tokens:
                      row t (a query) is how position t shares its attention among positions
                      0..t (the keys); the masked future, above the diagonal, is left empty.
                      --layer L and --head H keep only that layer and that head: one large map
    predictions.png   at each position, the token that came, the probability the model gave it,
                      and the model's five best guesses
    inspect.json      the same numbers, to plot them your own way
and prints the predictions as a table. Without matplotlib it writes the table and the JSON.

The attention weights are the ones the model's own forward pass computed: GPT.keep_attention
asks each attention layer to keep its softmax, P in minillm/layers/attention.py. Nothing here
computes attention a second time.

The prediction at position t comes from the logits of position t - 1, which saw the tokens
0..t - 1: probability p = softmax(logits)[token t] and loss -ln p, the loss cross_entropy
averages in training. The first token has no prediction (nothing came before it); after the
last one, the guesses are for the token that would come next.
"""

import json
import math
import sys
from pathlib import Path

import numpy

from minillm import backend, checkpoint, cli
from minillm.errors import ConfigError
from minillm.sampling import argument_text, encode_prompt
from minillm.tokenizers.bpe import TokenizerError
from minillm.tokenizers.char import UnknownCharactersError

PROG = "python -m minillm.inspect"
TOP_GUESSES = 5
JSON_FILE = "inspect.json"


def look_inside(model, tokenizer, ids):
    """What the model does with the token ids `ids` (a list, at most block_size of them).

    Returns a dict: "tokens" (each id's text), "ids", "attention" (n_layer, n_head, T, T)
    float64 on the host, "predictions" (one dict per position 1..T-1: "position", "token",
    "id", "probability", "loss", "guesses"), "next" (the guesses after the last token) and
    "mean_loss" (over the predictions; None without any). A guess is {"token", "id", "probability"}.
    """
    training, keeping = model.training, model.keep_attention
    model.eval()
    model.keep_attention = True
    try:
        logits, _ = model(numpy.array([ids]))
        attention = numpy.stack([backend.to_host(P[0]) for P in model.attention_weights]).astype(numpy.float64)
    finally:
        model.train(training)
        model.keep_attention = keeping
        model.attention_weights = None
    logits = backend.to_host(logits[0]).astype(numpy.float64)
    top = logits.max(axis=-1, keepdims=True)
    log_probs = logits - (top + numpy.log(numpy.exp(logits - top).sum(axis=-1, keepdims=True)))
    text = lambda i: tokenizer.decode([int(i)])

    def guesses(t):
        """The model's best guesses after position t, most likely first (ties in id order)."""
        best = numpy.argsort(-logits[t], kind="stable")[:TOP_GUESSES]
        return [{"token": text(i), "id": int(i), "probability": float(numpy.exp(log_probs[t, i]))} for i in best]

    predictions = [
        {"position": t, "token": text(ids[t]), "id": int(ids[t]),
         "probability": float(numpy.exp(log_probs[t - 1, ids[t]])), "loss": float(-log_probs[t - 1, ids[t]]),
         "guesses": guesses(t - 1)}
        for t in range(1, len(ids))
    ]
    mean_loss = sum(p["loss"] for p in predictions) / len(predictions) if predictions else None
    return {"tokens": [text(i) for i in ids], "ids": [int(i) for i in ids], "attention": attention,
            "predictions": predictions, "next": guesses(len(ids) - 1), "mean_loss": mean_loss}


def prediction_table(found):
    """The predictions as plain-text lines: position, token, its probability, the loss there, the guesses."""
    shown = lambda guess: f"{guess['token']!r} {guess['probability']:.3f}"
    lines = [f"{'pos':>4}  {'token':<10} {'p(token)':>9} {'loss':>7}   top {TOP_GUESSES} guesses (probability)"]
    lines.append(f"{0:>4}  {found['tokens'][0]!r:<10} {'':>9} {'':>7}   (the first token: nothing to predict it from)")
    for p in found["predictions"]:
        lines.append(f"{p['position']:>4}  {p['token']!r:<10} {p['probability']:>9.4f} {p['loss']:>7.3f}   "
                     + "  ".join(map(shown, p["guesses"])))
    lines.append(f"{'next':>4}  {'':<10} {'':>9} {'':>7}   " + "  ".join(map(shown, found["next"])))
    if found["mean_loss"] is not None:
        lines.append(f"mean loss {found['mean_loss']:.4f} over {len(found['predictions'])} predictions "
                     f"(perplexity {math.exp(found['mean_loss']):.2f})")
    return lines


def as_json(found, prompt, model):
    """The findings as JSON text; attention as nested lists [layer][head][query][key], 6 decimals."""
    document = {
        "prompt": prompt,
        "model": model.config.to_dict(),
        **found,
        "attention": numpy.round(found["attention"], 6).tolist(),
    }
    return json.dumps(document, ensure_ascii=False)


def parse_args(argv=None):
    parser = cli.ArgumentParser(
        prog=PROG,
        description="Look inside a model: the attention weights of every layer and head over a prompt, and what "
        "the model expected at each of its positions, as pictures (with matplotlib), a table and JSON.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--ckpt", default="out/ckpt.npz", metavar="PATH",
                       help="a checkpoint written by train.py (default: out/ckpt.npz)")
    where.add_argument("--init-from", default=None, metavar="DIR",
                       help="a Hugging Face GPT-2 directory instead: config.json, model.safetensors, "
                       "vocab.json and merges.txt")
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="the text to look at")
    parser.add_argument("--out-dir", default="inspect", metavar="DIR",
                        help="folder for attention.png, predictions.png and inspect.json (default: inspect)")
    parser.add_argument("--layer", type=int, default=None, metavar="L",
                        help="draw only this layer's attention (counted from 0)")
    parser.add_argument("--head", type=int, default=None, metavar="H",
                        help="draw only this head's attention (counted from 0); with --layer, one large map")
    parser.add_argument("--device", default="cpu", choices=backend.DEVICES, help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--reference", action="store_true",
                        help="run on the reference layers (minillm/layers: the equations as written)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    if not args.prompt:
        parser.error('--prompt is empty: give the text to look at, for example --prompt "def main():"')
    try:
        args.prompt = argument_text(args.prompt, "--prompt", ConfigError)
    except ConfigError as err:
        parser.error(str(err))
    return parser, args


def load_model(args):
    """(model, tokenizer) from --init-from or --ckpt, with any LoRA adapters merged (the same logits)."""
    device = backend.resolve_device(args.device)
    if args.init_from:
        return checkpoint.load_pretrained(args.init_from, device=device)
    return checkpoint.load_merged(args.ckpt, device, "--ckpt PATH or --init-from GPT2_DIR")


def check_choice(parser, flag, value, count, what):
    """A usage error unless --layer / --head `value` (or None) picks one of `count` layers or heads."""
    if value is not None and not 0 <= value < count:
        parser.error(f"{flag} {value} is out of range: the model has {count} {what}, numbered 0 to {count - 1}")


def main(argv=None):
    parser, args = parse_args(argv)
    return cli.run(PROG, lambda: look(parser, args), args.debug)


def look(parser, args):
    """Load the model, check --layer and --head, print the table, write the JSON and the pictures."""
    model, tokenizer = load_model(args)
    model.reference = args.reference
    cfg = model.config
    check_choice(parser, "--layer", args.layer, cfg.n_layer, "layers")
    check_choice(parser, "--head", args.head, cfg.n_head, "heads per layer")
    try:
        ids = encode_prompt(tokenizer, args.prompt)
    except (UnknownCharactersError, TokenizerError) as err:
        raise type(err)(f"cannot encode the prompt: {err}") from None
    if len(ids) > cfg.block_size:
        print(f"{PROG}: note: the prompt has {len(ids)} tokens; looking at the last {cfg.block_size} "
              "(the model's context)", file=sys.stderr)
        ids = ids[-cfg.block_size:]

    found = look_inside(model, tokenizer, ids)
    print("\n".join(prediction_table(found)))
    out_dir = Path(args.out_dir)
    json_text = as_json(found, args.prompt, model)
    checkpoint.atomic_write(out_dir / JSON_FILE, lambda f: f.write(json_text.encode("utf-8")))
    written = draw(found, args.layer, args.head, out_dir)
    if written is None:
        print(f"{PROG}: note: no pictures without matplotlib (pip install -e \".[plots]\"); "
              f"the table is above and the numbers are in {out_dir / JSON_FILE}", file=sys.stderr)
        written = []
    print(f"wrote {', '.join(str(out_dir / name) for name in [*written, JSON_FILE])}")


def draw(found, layer, head, out_dir):
    """The pictures' file names, once written; None when matplotlib is missing."""
    try:
        from minillm import inspect_plots
    except ImportError:
        return None
    return inspect_plots.draw_all(found, layer, head, out_dir)


if __name__ == "__main__":
    sys.exit(main())
