"""python -m minillm.gradcheck: every layer, and the whole model, against central finite differences.

It checks, in float64, on a tiny model with random weights and one random batch:
  1. each layer on its own (minillm.testing.cases, at the model's sizes), in both readings, the
     reference (minillm/layers) and the fast one (minillm/fast), and the model's block_backward on
     each: a wrong backward pass is named here, with the input whose gradient is wrong;
  2. every parameter's gradient from model.backward(), on the fast layers and on the reference ones.
It prints a table of each, and exits with status 1 if any gradient is WRONG, NaN, or unchecked
(zero in both: nothing was compared). --reference or --fast checks only that reading.

The difference formula, its steps and the error measure are minillm.testing's (minillm/testing/numeric.py);
each verdict is a row of minillm.testing's report (exact, ok, WRONG, unchecked, skipped).
"""

import math
import sys

import numpy

import minillm.fast
import minillm.layers
from minillm import backend, cli, finetune
from minillm.model import GPT, GPTConfig, block_backward, block_forward
from minillm.testing import cases
from minillm.testing.numeric import TOLERANCE, best_numerical_gradient
from minillm.testing.report import GradientReport, compare_row

READINGS = {"reference": minillm.layers, "fast": minillm.fast}


def randomize(params, seed, std=0.5):
    """Overwrite every parameter with N(0, std^2) values: no zero biases, no unit gains.

    GPT-2's own initialisation (zero biases, LayerNorm gains of one) would leave
    symmetric cases that a wrong gradient could pass.
    """
    rng = numpy.random.default_rng(seed)
    for p in params.values():
        xp = backend.get_array_module(p)
        p[...] = xp.asarray(rng.normal(0.0, std, size=p.shape))


def model_report(model, idx, targets, dropout_seed=0, tolerance=TOLERANCE):
    """A GradientReport with a row for every trainable parameter of a float64 model on one batch.

    With dropout, the generator is reseeded before every forward pass, so all the
    perturbed passes draw the same masks as the analytic one.
    """
    def loss():
        model.rng = backend.RNG(dropout_seed, model.device)
        return model(idx, targets)[1]

    loss()
    analytic = model.backward()
    rows = []
    for name, p in model.trainable_params().items():
        error, numeric = best_numerical_gradient(analytic[name], loss, p, tolerance)
        rows.append(compare_row(name, analytic[name], numeric, tolerance, error))
    reading = "reference" if model.reference else "fast"
    return GradientReport(f"the model's parameters on the {reading} layers", rows, tolerance, heading="parameter")


def layer_reports(sizes, readings, dropout_p, seed, tolerance, device="cpu"):
    """{"reading.layer": GradientReport} for every layer case and the model's block, in each reading."""
    reports = {}
    for reading in readings:
        layers = READINGS[reading]
        for name in cases.LAYER_NAMES:
            case = cases.layer_case(name, getattr(layers, name), sizes, seed, dropout_p)
            reports[f"{reading}.{name}"] = case.on(device).check(tolerance, seed)
        case = cases.block_case(block_forward, block_backward, layers, sizes, seed, dropout_p)
        reports[f"{reading}.block"] = case.on(device).check(tolerance, seed)
    return reports


def build_parser():
    parser = cli.ArgumentParser(
        prog="python -m minillm.gradcheck",
        description="Check the analytic gradients against central finite differences, in float64: every layer on "
        "its own, in the reference and the fast reading, then every parameter of a tiny model with random weights "
        "on one random batch, on both readings. Prints a table of each and exits with status 1 if any gradient is "
        "WRONG, or zero in both (nothing was checked).",
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
                        help="check LoRA adapters of this rank "
                             "(only they are checked, as only they train; default: 0, none)")
    parser.add_argument("--lora-targets", default="attn,mlp",
                        help="the projections with adapters: attn, mlp or attn,mlp (default: attn,mlp)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seed of the weights, the batch and the dropout masks (default: 0)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, metavar="TOL",
                        help=f"largest relative error that passes, positive and finite (default: {TOLERANCE:g})")
    parser.add_argument("--device", default="cpu", choices=backend.DEVICES, help="cpu, cuda or auto (default: cpu)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--reference", action="store_true",
                      help="check only the reference reading (minillm/layers, and the model on it)")
    only.add_argument("--fast", action="store_true",
                      help="check only the fast reading (minillm/fast, and the model on it)")
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
    """Check the layers and the model the options describe, print the tables; 1 if any gradient fails."""
    config = GPTConfig(
        vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
        n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout, bias=not args.no_bias,
    )
    readings = ["reference"] if args.reference else ["fast"] if args.fast else ["reference", "fast"]
    device = backend.resolve_device(args.device)
    rng = numpy.random.default_rng(args.seed)
    shape = (args.batch_size, args.block_size)
    idx = rng.integers(0, args.vocab_size, size=shape)
    targets = rng.integers(0, args.vocab_size, size=shape)
    print(
        f"model: n_layer {config.n_layer}, n_head {config.n_head}, n_embd {config.n_embd}, vocab_size "
        f"{config.vocab_size}, block_size {config.block_size}, dropout {config.dropout}, "
        + ("no biases" if args.no_bias else "biases")
        + (f", LoRA rank {args.lora_rank} on {args.lora_targets}" if args.lora_rank else "")
        + f"; {' and '.join(readings)} layers, float64, on {device}; "
        f"batch {args.batch_size} x {args.block_size} tokens, seed {args.seed}\n"
    )

    sizes = cases.Sizes(batch=args.batch_size, time=args.block_size, n_head=args.n_head,
                        head_size=args.n_embd // args.n_head, vocab=args.vocab_size, bias=not args.no_bias)
    layers = layer_reports(sizes, readings, args.dropout, args.seed, args.tolerance, device)
    print_layer_table(layers, sizes)
    models = []
    for reading in readings:
        model = GPT(config, seed=args.seed, dtype="float64", device=device, reference=reading == "reference")
        if args.lora_rank:
            model = finetune.with_lora(model, args.lora_rank, alpha=3.0, targets=args.lora_targets, seed=args.seed)
        randomize(model.params, args.seed)
        models.append(model_report(model, idx, targets, dropout_seed=args.seed, tolerance=args.tolerance))
        print(f"\n{models[-1]}")

    units = list(layers.values()) + [row for report in models for row in report.rows]
    failed = sum(not unit.ok for unit in units)
    unchecked = sum(row.verdict == "unchecked" for report in [*layers.values(), *models] for row in report.rows)
    errors = [row.rel_error for report in [*layers.values(), *models] for row in report.rows
              if row.rel_error is not None]
    worst = max(errors, key=lambda e: math.inf if math.isnan(e) else e, default=0.0)
    print(f"\nworst {worst:.3e}; tolerance {args.tolerance:.0e}; {len(units) - failed} passed, {failed} failed"
          + (f" ({unchecked} unchecked)" if unchecked else ""))
    return 1 if failed else 0


def print_layer_table(reports, sizes):
    """One line per layer check, then the whole report of each one that failed."""
    print(f"each layer on its own: batch {sizes.batch}, time {sizes.time}, {sizes.n_head} heads of {sizes.head_size}, "
          f"vocabulary {sizes.vocab}")
    width = max(map(len, reports))
    print(f"{'layer':<{width}}  {'worst rel. error':>16}  verdict")
    for name, report in reports.items():
        errors = [row.rel_error for row in report.rows if row.rel_error is not None]
        worst = max(errors, key=lambda e: math.inf if math.isnan(e) else e, default=None)
        verdict = "ok" if report.ok else "WRONG: " + ", ".join(row.name for row in report.failing)
        print(f"{name:<{width}}  {'-' if worst is None else f'{worst:.3e}':>16}  {verdict}")
    for name, report in reports.items():
        if not report.ok:
            print(f"\n{name}: {report}")


if __name__ == "__main__":
    sys.exit(main())
