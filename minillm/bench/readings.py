"""What the fast path buys: training steps on the reference layers, on the fast ones, and on the
fast ones with one trick taken back out, timed in turns.

    python -m minillm.bench.readings [--write] [--configs baby small]

The step is train.py's train_step over every CPU thread, as in minillm.bench.training.
Each "without" row runs the all-fast step with one piece of minillm.fast put back to the
reference's code (forward and backward together; every other piece stays fast, including
the fast layers that call it): its figure is the median over rounds of that step's time
over the all-fast step's, so 1.25x means the trick saves a fifth of a step (removing it
makes the step 25% slower).
"""

import argparse
import contextlib
import statistics
from unittest import mock

import minillm.fast
import minillm.layers
from minillm import optim, system
from minillm.bench.common import format_table, interleaved_times, write_section
from minillm.bench.configs import CONFIGS
from minillm.bench.training import training_step

TITLE = "Two readings: the reference layers against the fast ones"

# name -> (what the trick is, [(object, attribute, the reference's value)])
TRICKS = {
    "linear": ("one 2-D matrix product over all rows; the bias added in place",
               [(minillm.fast.linear, f, getattr(minillm.layers.linear, f)) for f in ("forward", "backward")]),
    "layernorm": ("in-place normalisation and dx",
                  [(minillm.fast.layernorm, f, getattr(minillm.layers.layernorm, f)) for f in ("forward", "backward")]),
    "gelu": ("in-place chains on one or two buffers",
             [(minillm.fast.gelu, f, getattr(minillm.layers.gelu, f)) for f in ("forward", "backward")]),
    "softmax": ("exp and normalisation in place",
                [(minillm.fast.softmax, f, getattr(minillm.layers.softmax, f)) for f in ("forward", "backward")]),
    "row sums as products": ("rows.py: LayerNorm's and softmax's row sums as matrix-vector products",
                             [(minillm.fast.layernorm, "row_means", lambda a: a.mean(axis=-1, keepdims=True)),
                              (minillm.fast.softmax, "row_sums", lambda a: a.sum(axis=-1, keepdims=True))]),
    "attention": ("causal query blocks, outputs written in place, masks built once (with its own projections "
                  "and softmax: the reference attention calls the reference ones)",
                  [(minillm.fast.attention, f, getattr(minillm.layers.attention, f)) for f in ("forward", "backward")]),
    "cross-entropy": ("probabilities and their gradient in place",
                      [(minillm.fast.cross_entropy, f, getattr(minillm.layers.cross_entropy, f))
                       for f in ("forward", "backward")]),
    "AdamW": ("the update in place, bias corrections folded into two scalars",
              [(minillm.fast.adamw, "adamw_update", optim.adamw_update)]),
}


def without(step, patches):
    """step() with each (object, attribute) set to the given value for the call."""
    def run():
        with contextlib.ExitStack() as stack:
            for target, attribute, value in patches:
                stack.enter_context(mock.patch.object(target, attribute, value))
            step()

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minillm.bench.readings", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["baby", "small"], choices=sorted(CONFIGS))
    parser.add_argument("--threads", type=int, default=system.usable_cores())
    parser.add_argument("--repeat", type=int, default=1, metavar="K",
                        help="K times the training benchmark's rounds per configuration "
                             "(more rounds, steadier medians)")
    parser.add_argument("--write", action="store_true", help=f"put the table into BENCHMARKS.md under '{TITLE}'")
    args = parser.parse_args(argv)

    medians, ratios = {}, {}
    for name in args.configs:
        config, batch_size, rounds = CONFIGS[name]
        rounds *= args.repeat
        fast = training_step(config, batch_size, args.threads)
        functions = {"fast": fast, "reference": training_step(config, batch_size, args.threads, reference=True)}
        functions |= {trick: without(fast, patches) for trick, (_, patches) in TRICKS.items()}
        times = interleaved_times(functions, rounds)
        medians[name] = {variant: statistics.median(t) for variant, t in times.items()}
        ratios[name] = {variant: statistics.median(v / f for v, f in zip(t, times["fast"]))
                        for variant, t in times.items()}
        print(f"{name}: fast {1000 * medians[name]['fast']:.0f} ms, "
              f"reference {1000 * medians[name]['reference']:.0f} ms "
              f"({ratios[name]['reference']:.2f}x)", flush=True)

    cell = lambda name, variant: f"{1000 * medians[name][variant]:.0f} ms ({ratios[name][variant]:.2f}x)"
    rows = [["all fast (the default)", "", *(cell(n, "fast") for n in args.configs)],
            ["all reference (`--reference`)", "", *(cell(n, "reference") for n in args.configs)]]
    rows += [[f"without: {trick}", what, *(cell(n, trick) for n in args.configs)]
             for trick, (what, _) in TRICKS.items()]
    table = format_table(["layers", "the trick", *(f"{n} step" for n in args.configs)], rows)
    report = (
        f"{table}\n\nA training step (forward, backward, clipping, AdamW) on {args.threads} threads; each cell the "
        f"median step time and, in brackets, the median over rounds of its time / the all-fast step's, all variants "
        f"timed in turns ({', '.join(f'{args.repeat * CONFIGS[n][2]} rounds of {n}' for n in args.configs)}). "
        "A \"without\" row puts one piece of minillm.fast back to the reference's code.\n"
    )
    print("\n" + report)
    if args.write:
        write_section(TITLE, report)


if __name__ == "__main__":
    main()
