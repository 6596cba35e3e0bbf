"""The command line: python -m minillm.exercises list | start NAME | check NAME | hint NAME [K]."""

import os

from minillm import cli
from minillm.exercises import catalog, checking, source
from minillm.exercises.catalog import DEFAULT_DIR, EXERCISES, PROG, ExerciseError


def build_parser():
    parser = cli.ArgumentParser(
        prog=PROG,
        description="Write every backward pass of GPT-2 yourself, and have each checked against finite "
        "differences. `start NAME` writes NAME.py into the exercises folder: the layer's forward pass, and a "
        "backward pass for you to write; `check NAME` checks it; `hint NAME` gives its equations one step at "
        "a time; `list` shows where you are. Then `python train.py --layers-from DIR` trains on every layer "
        "of yours that passes.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=cli.ArgumentParser)

    def add(name, help_text):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--dir", default=DEFAULT_DIR, metavar="DIR",
                             help=f"the folder of your exercise files (default: {DEFAULT_DIR})")
        return command

    add("list", "the exercises in reading order, each with its status: not started, failing or passed")
    start = add("start", "write DIR/NAME.py: the reference layer with its backward pass left for you to write")
    start.add_argument("name", metavar="NAME", help="the exercise (see list)")
    start.add_argument("--force", action="store_true", help="replace the file even if it is there (your work is lost)")
    check = add("check", "check DIR/NAME.py over many shapes, the smallest first; exit status 0 when it passes")
    check.add_argument("name", metavar="NAME", help="the exercise (see list)")
    hint = commands.add_parser("hint", help="the K-th step of the exercise's backward equations",
                               description="the K-th step of the exercise's backward equations (default: the first)")
    hint.add_argument("name", metavar="NAME", help="the exercise (see list)")
    hint.add_argument("k", type=int, nargs="?", default=1, metavar="K", help="which step (default: 1)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return cli.run(PROG, lambda: run(args))


def run(args):
    """The command's exit status; an ExerciseError is one line on stderr with its own status."""
    try:
        return COMMANDS[args.command](args)
    except ExerciseError as err:
        return cli.report(PROG, err, err, err.status, None)


def list_exercises(args):
    # Every status first: one that needs a check that cannot run is then one line, not half a table.
    statuses = [checking.status(exercise, args.dir)[0] for exercise in EXERCISES]
    print(f"exercises in {os.path.join(args.dir, '')} ({PROG} start NAME begins one):")
    width = max(len(name) for name in catalog.NAMES)
    for number, (exercise, status) in enumerate(zip(EXERCISES, statuses), 1):
        print(f"{number:>3}. {exercise.name:<{width}}  {status:<11}  {exercise.summary}")


def start(args):
    exercise = catalog.get(args.name)
    path = exercise.path(args.dir)
    if path.exists() and not args.force:
        raise ExerciseError(f"{path} is already there and may hold your work: --force replaces it", status=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source.exercise_file(exercise), encoding="utf-8")
    there = "" if args.dir == DEFAULT_DIR else f" --dir {args.dir}"
    print(f"wrote {path}: write its {'adamw_update' if exercise.kind == 'adamw' else 'backward'}, then "
          f"{PROG} check {exercise.name}{there}")


def check(args):
    outcome = checking.checked(catalog.get(args.name), args.dir)
    print("\n".join(outcome.lines))
    return cli.DONE if outcome.passed else cli.FAILED


def hint(args):
    exercise = catalog.get(args.name)
    steps = source.hints(exercise)
    if not 1 <= args.k <= len(steps):
        raise ExerciseError(f"{exercise.name} has {len(steps)} hints: ask for one from 1 to {len(steps)}", status=2)
    print(f"hint {args.k} of {len(steps)} ({exercise.name}):")
    print("\n".join(f"    {line}" for line in steps[args.k - 1].splitlines()))
    if args.k < len(steps):
        print(f"next: {PROG} hint {exercise.name} {args.k + 1}")


COMMANDS = {"list": list_exercises, "start": start, "check": check, "hint": hint}
