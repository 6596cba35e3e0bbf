"""Numerical gradient checking: analytic gradients against central finite differences.

    numeric_i = (8 (f(x + h e_i) - f(x - h e_i)) - (f(x + 2h e_i) - f(x - 2h e_i))) / (12 h)

the fourth-order central difference, one element at a time. Its error is O(h^4)
where the plain (f(x + h) - f(x - h)) / 2h has O(h^2), so h can stay large enough
that float64 rounding (about 1e-16 |f| / h) stays small too: with h = 1e-4 typical
errors are near 1e-10.

Near a point where f bends sharply (a LayerNorm whose input row has almost no
variance, say) the O(h^4) term can still be large. `gradient_error` then tries
smaller steps, 1e-5 and 1e-6, and keeps the best: an error of the difference
formula shrinks with h, while a wrong analytic gradient stays wrong at every h.

The error measure, per array (one parameter, or one layer input):

    relative_error(analytic, numeric) = max_i |analytic_i - numeric_i| / max_i max(|analytic_i|, |numeric_i|)

i.e. the worst element's error measured against the array's largest gradient. It is
0 for a perfect match, and it does not blow up on elements whose gradient is near 0
(where an element-by-element ratio would divide noise by noise).

Run it as a command:  python -m minillm.gradcheck [--n-layer 2 --n-head 2 ...]
It builds a tiny float64 model with random weights, prints the error of every
parameter, and exits with status 1 if any exceeds the tolerance.
"""

import math
import sys

import numpy

from minillm import backend, cli
from minillm.model import GPT, GPTConfig

TOLERANCE = 1e-6
STEPS = (1e-4, 1e-5, 1e-6)


def numerical_gradient(f, x, h=STEPS[0]):
    """Fourth-order central-difference gradient of the scalar function f() with respect to the array x.

    x is perturbed in place, one element at a time, and restored afterwards.
    """
    xp = backend.get_array_module(x)
    grad = xp.zeros(x.shape, dtype=numpy.float64)
    flat = x.reshape(-1)  # a view: writing to it perturbs x
    grad_flat = grad.reshape(-1)

    def f_at(i, value):
        flat[i] = value
        return float(f())

    for i in range(flat.size):
        original = flat[i].copy()
        near = f_at(i, original + h) - f_at(i, original - h)
        far = f_at(i, original + 2 * h) - f_at(i, original - 2 * h)
        flat[i] = original
        grad_flat[i] = (8 * near - far) / (12 * h)
    return grad


def relative_error(analytic, numeric):
    """max |a - n| / max(|a|, |n|) over the array (see the module docstring); 0 when both are 0."""
    a = backend.to_host(analytic).astype(numpy.float64)
    n = backend.to_host(numeric).astype(numpy.float64)
    scale = max(numpy.abs(a).max(initial=0.0), numpy.abs(n).max(initial=0.0))
    if scale == 0.0:
        return 0.0
    return float(numpy.abs(a - n).max() / scale)


def gradient_error(analytic, f, x, tolerance=TOLERANCE):
    """relative_error of `analytic` against the numerical gradient of f() w.r.t. x, trying STEPS in turn.

    Returns the first error within the tolerance, or the smallest one when none is.
    """
    errors = []
    for h in STEPS:
        errors.append(relative_error(analytic, numerical_gradient(f, x, h)))
        if errors[-1] <= tolerance:
            break
    return min(errors)


def randomize(params, seed, std=0.5):
    """Overwrite every parameter with N(0, std^2) values: no zero biases, no unit gains.

    GPT-2's own initialisation (zero biases, LayerNorm gains of one) would leave
    symmetric cases that a wrong gradient could pass.
    """
    rng = numpy.random.default_rng(seed)
    for p in params.values():
        xp = backend.get_array_module(p)
        p[...] = xp.asarray(rng.normal(0.0, std, size=p.shape))


def model_gradient_errors(model, idx, targets, dropout_seed=0, tolerance=TOLERANCE):
    """{name: relative error} for every trainable parameter of a float64 model on one batch.

    With dropout, the generator is reseeded before every forward pass, so all the
    perturbed passes draw the same masks as the analytic one.
    """
    return model_gradients_and_errors(model, idx, targets, dropout_seed, tolerance)[1]


def model_gradients_and_errors(model, idx, targets, dropout_seed=0, tolerance=TOLERANCE):
    """(the analytic gradients, {name: relative error}) of model_gradient_errors."""
    def loss():
        model.rng = backend.RNG(dropout_seed, model.device)
        return model(idx, targets)[1]

    loss()
    analytic = model.backward()
    trainable = model.trainable_params()
    return analytic, {name: gradient_error(analytic[name], loss, p, tolerance) for name, p in trainable.items()}


def build_parser():
    parser = cli.ArgumentParser(
        prog="python -m minillm.gradcheck",
        description="Check the model's analytic gradients against central finite differences, in float64, on a "
        "tiny model with random weights and one random batch. Prints every parameter's error and exits with "
        "status 1 if any is above the tolerance, or if a gradient is zero in both (nothing was checked).",
    )
    parser.add_argument("--vocab-size", type=int, default=11, metavar="N", help="vocabulary size (default: 11)")
    parser.add_argument("--block-size", type=int, default=6, metavar="T",
                        help="context length, and the length of the batch's sequences (default: 6)")
    parser.add_argument("--n-layer", type=int, default=2, metavar="N", help="transformer blocks (default: 2)")
    parser.add_argument("--n-head", type=int, default=2, metavar="N",
                        help="attention heads, must divide --n-embd (default: 2)")
    parser.add_argument("--n-embd", type=int, default=8, metavar="C", help="embedding width (default: 8)")
    parser.add_argument("--batch-size", type=int, default=2, metavar="B", help="sequences in the batch (default: 2)")
    parser.add_argument("--dropout", type=float, default=0.1, metavar="P",
                        help="dropout probability in [0, 1); the same masks in every perturbed pass (default: 0.1)")
    parser.add_argument("--no-bias", action="store_true", help="check the bias-free variant")
    parser.add_argument("--lora-rank", type=int, default=0, metavar="R",
                        help="check LoRA adapters of this rank (only they are checked, as only they train; default: 0, none)")
    parser.add_argument("--lora-targets", default="attn,mlp",
                        help="the projections with adapters: attn, mlp or attn,mlp (default: attn,mlp)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seed of the weights, the batch and the dropout masks (default: 0)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, metavar="TOL",
                        help=f"largest relative error that passes, positive and finite (default: {TOLERANCE:g})")
    parser.add_argument("--device", default="cpu", choices=backend.DEVICES, help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--reference", action="store_true",
                        help="check the model on the reference layers (minillm.layers) instead of the fast ones")
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.lora_rank < 0 or args.seed < 0:
        name = "lora_rank" if args.lora_rank < 0 else "seed"
        parser.error(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if not 0 < args.tolerance < math.inf:
        parser.error(f"--tolerance must be positive and finite, got {args.tolerance}")
    return args


def main(argv=None):
    args = parse_args(argv)
    return cli.run("python -m minillm.gradcheck", lambda: check(args))


def check(args):
    """Build the model and batch the options describe, print each parameter's error; 1 if any fails."""
    config = GPTConfig(
        vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
        n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout, bias=not args.no_bias,
    )
    model = GPT(config, seed=args.seed, dtype="float64", device=args.device, reference=args.reference)
    if args.lora_rank:
        model = model.with_lora(args.lora_rank, alpha=3.0, targets=args.lora_targets, seed=args.seed)
    randomize(model.params, args.seed)
    rng = numpy.random.default_rng(args.seed)
    shape = (args.batch_size, args.block_size)
    idx = rng.integers(0, args.vocab_size, size=shape)
    targets = rng.integers(0, args.vocab_size, size=shape)
    print(
        f"model: n_layer {config.n_layer}, n_head {config.n_head}, n_embd {config.n_embd}, vocab_size "
        f"{config.vocab_size}, block_size {config.block_size}, dropout {config.dropout}, "
        + ("no biases" if args.no_bias else "biases")
        + (f", LoRA rank {args.lora_rank} on {args.lora_targets}" if args.lora_rank else "")
        + f"; {'reference' if args.reference else 'fast'} layers, float64, on {model.device}; "
        f"batch {args.batch_size} x {args.block_size} tokens, seed {args.seed}\n"
    )

    analytic, errors = model_gradients_and_errors(model, idx, targets, dropout_seed=args.seed, tolerance=args.tolerance)
    # A gradient that is zero in both readings compares nothing: it is reported, and it fails.
    unchecked = {name for name, g in analytic.items() if not numpy.any(backend.to_host(g))}
    width = max(len(name) for name in errors)
    print(f"{'parameter':<{width}}  {'shape':>10}  {'max rel. error':>14}")
    for name, error in errors.items():
        shape_text = "x".join(map(str, model.params[name].shape))
        flag = "  UNCHECKED (gradient 0)" if name in unchecked else "" if error <= args.tolerance else "  FAIL"
        print(f"{name:<{width}}  {shape_text:>10}  {error:14.3e}{flag}")
    # Written so that a NaN error fails: NaN <= tolerance is false.
    passed = sum(error <= args.tolerance and name not in unchecked for name, error in errors.items())
    failed = len(errors) - passed
    worst = max(errors.values(), key=lambda e: math.inf if math.isnan(e) else e)
    print(f"\nworst {worst:.3e}; tolerance {args.tolerance:.0e}; {passed} passed, {failed} failed"
          + (f" ({len(unchecked)} unchecked)" if unchecked else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
