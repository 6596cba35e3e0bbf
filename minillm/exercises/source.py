"""The exercise files and the hints, both cut from the reference sources' own text.

A layer's exercise is its reference module, minillm/layers/NAME.py, with two cuts: the module
docstring loses its `backward:` section (and a derivation paragraph, where there is one), and the
body of `backward` becomes a `raise NotImplementedError`. Everything else is the reference's text,
so the forward pass a learner differentiates is the very one the model runs. `ast` gives the line
numbers; the text itself is never regenerated from the tree.

The hints are what was cut: the `backward:` section split into steps, then the derivation.
"""

import ast
import inspect
import re
import textwrap

import minillm.model
import minillm.optim
from minillm.exercises.catalog import PROG

SECTION = "backward:"
DERIVATION = "Derivation"
BLANK_PREFIX = "not written yet"


def read(path):
    return path.read_text(encoding="utf-8")


def function_node(tree, name):
    return next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name)


def docstring_lines(tree):
    """(first, last) line numbers (1-based, inclusive) of the module docstring's expression."""
    node = tree.body[0]
    return node.lineno, node.end_lineno


def indent(line):
    return len(line) - len(line.lstrip(" "))


def backward_section(lines):
    """(start, end, base) of the `backward:` section among the docstring's lines: lines[start:end], whose
    steps start at column `base`; it ends at a blank line or at a line indented less than its steps."""
    start = next(i for i, line in enumerate(lines) if line.startswith(SECTION))
    rest = lines[start][len(SECTION):]
    base = len(SECTION) + indent(rest)
    end = start + 1
    while end < len(lines) and lines[end].strip() and indent(lines[end]) >= base:
        end += 1
    return start, end, base


def paragraphs(lines):
    """(start, end) of each run of non-blank lines."""
    spans, start = [], None
    for i, line in enumerate(lines + [""]):
        if line.strip() and start is None:
            start = i
        elif not line.strip() and start is not None:
            spans.append((start, i))
            start = None
    return spans


def continues(line):
    """Whether the step this line is in goes on at the next line of the same indent: after a colon, a
    comma or a trailing "so", and after prose (no equation) that has not reached its full stop."""
    text = line.rstrip()
    return text.endswith((":", ",", " so")) or (" = " not in text and not text.endswith("."))


def steps_of(lines, base):
    """A section's lines as steps: a line at the base indent starts one unless the line before continues;
    deeper lines belong to the step above them."""
    steps = []
    for line in lines:
        text = line[base:].rstrip()
        if steps and (indent(line) > base or continues(steps[-1][-1])):
            steps[-1].append(text)
        else:
            steps.append([text])
    return ["\n".join(step) for step in steps]


def layer_hints(exercise):
    """The steps of a layer's backward equations, then its derivation paragraph where it has one."""
    lines = ast.get_docstring(ast.parse(read(exercise.reference)), clean=False).splitlines()
    start, end, base = backward_section(lines)
    hints = steps_of(lines[start:end], base)
    for first, last in paragraphs(lines):
        if first >= end and lines[first].startswith(DERIVATION):
            hints.append("\n".join(lines[first:last]))
    return hints


def block_hints():
    """The model docstring's paragraph on the backward pass, then block_backward's comments, in order."""
    doc = inspect.getdoc(minillm.model).splitlines()
    first, last = next((a, b) for a, b in paragraphs(doc) if doc[a].startswith("The backward"))
    # The paragraph ends on the tied embedding, which is the model's business, not the block's.
    sentences = re.split(r"(?<=\.)\s+", " ".join(doc[first:last]))
    hints = [textwrap.fill(" ".join(sentence for sentence in sentences if "wte" not in sentence), 100)]
    source = inspect.getsource(minillm.model.block_backward)
    hints += [line.strip()[1:].strip() for line in source.splitlines() if line.strip().startswith("#")]
    return hints


def adamw_equations():
    """The optimiser docstring's AdamW equations: its header line and one line per equation."""
    doc = inspect.getdoc(minillm.optim).splitlines()
    first, last = next((a, b) for a, b in paragraphs(doc) if doc[a].startswith("AdamW") and doc[a].endswith(":"))
    return doc[first], [line.strip() for line in doc[first + 1:last]]


def hints(exercise):
    if exercise.kind == "layer":
        return layer_hints(exercise)
    if exercise.kind == "block":
        return block_hints()
    return adamw_equations()[1]


def returns(docstring):
    """What a reference backward's docstring says it returns: "(dx, dw, db)" from "Returns (dx, dw, db); ..."."""
    return re.match(r"Returns (\([^)]*\)|\w+)", docstring).group(1)


def blank_body(indentation, what, name):
    """The raise that stands in for a body yet to be written, its message in literals of a readable width."""
    pad = " " * indentation
    pieces = textwrap.wrap(f"{BLANK_PREFIX}: {what} ", 80, drop_whitespace=False)
    literals = [f'"{piece}"' for piece in pieces + [f"(stuck? {PROG} hint {name})"]]
    opening = f"{pad}raise NotImplementedError("
    return opening + f"\n{' ' * len(opening)}".join(literals) + ")\n"


def commands(name):
    return (f"    {PROG} check {name}   checks it\n"
            f"    {PROG} hint {name}    gives a first step, and `hint {name} 2` the next")


def layer_file(exercise):
    """A layer's reference source with the backward equations withheld and backward's body blank."""
    text = read(exercise.reference)
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    backward = function_node(tree, "backward")
    gives = returns(ast.get_docstring(backward))
    frozen = any(arg.arg == "weight_grads" for arg in backward.args.args)
    body_start = backward.body[1].lineno
    blanked = lines[:body_start - 1] + [blank_body(indent(lines[body_start - 1]), f"return {gives}",
                                                   exercise.name)] + lines[backward.end_lineno:]

    doc = ast.get_docstring(tree, clean=False).splitlines()
    start, end, _ = backward_section(doc)
    derivations = [(a, b) for a, b in paragraphs(doc) if a >= end and doc[a].startswith(DERIVATION)]
    cut = set(range(start, end)).union(*(range(a, b) for a, b in derivations))
    kept = [line for i, line in enumerate(doc) if i not in cut]
    task = (f"Your exercise: write `backward` below, the gradient of this forward pass. It returns {gives}. "
            + ("weight_grads=False (a frozen layer) asks for dx alone: the weight and bias gradients are then "
               "None. " if frozen else "")
            + "Each line of forward is a step to differentiate, taken in reverse order.")
    task = [textwrap.fill(task, 100), commands(exercise.name)]
    first, last = docstring_lines(tree)
    return "".join(blanked[:first - 1]) + module_docstring(kept, task) + "".join(blanked[last:])


def module_docstring(lines, task):
    """A docstring of `lines` (runs of blank lines closed up, none at the end), a blank line, then `task`."""
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip()
    return f'"""{text}\n\n' + "\n".join(task) + '\n"""\n'


def signature_and_docstring(function):
    """A function's def line(s) and docstring, as written in its module."""
    lines = inspect.getsource(function).splitlines(keepends=True)
    node = ast.parse("".join(lines)).body[0]
    return "".join(lines[:node.body[0].end_lineno])


def block_file():
    """The model's block_forward as it is, and block_backward with its signature, docstring and a blank body."""
    model_doc = inspect.getdoc(minillm.model).splitlines()
    equations = [line.strip() for line in model_doc if "x + dropout(" in line]
    lines = ["The transformer block of GPT-2: LayerNorm first, and a residual around each half.", ""]
    lines += [f"    {line}" for line in equations]
    lines += [
        "",
        "block_forward below is minillm/model.py's own, here to read: `check` and training run the model's",
        "with your block_backward. It calls each layer through `layers` (layers.attention.forward, ...), and",
        "returns the caches of those calls, in order, for the backward pass.",
    ]
    task = [
        "Your exercise: write block_backward, the gradient of block_forward. It returns (dx, grads): dx,",
        "the gradient of the block's input, and grads, {prefix + name: gradient} for every weight the forward",
        "reads as p(name) (None for a bias the model leaves out: the layer's backward returns None there).",
        "Call each layer's backward through `layers`, in the reverse order of the forward's calls.",
        "layers.attention.backward and layers.mlp.backward take weight_grads: pass them",
        "weight_grads=tuning.wants(*names), where names are the prefixed names of the four weights and",
        "biases the forward hands that layer. `tuning` knows which weights train, and a layer none of whose",
        "weights train (a frozen one) then passes the gradient on without forming its weight gradients.",
        commands("block"),
    ]
    backward = signature_and_docstring(minillm.model.block_backward)
    return (module_docstring(lines, task) + "\n\n" + inspect.getsource(minillm.model.block_forward) + "\n\n"
            + backward + blank_body(4, "return (dx, grads), and pass weight_grads=tuning.wants(*names) on to "
                                    "layers.attention.backward and layers.mlp.backward", "block"))


def adamw_file():
    """AdamW's equations, the spec, above adamw_update with its signature, docstring and a blank body."""
    header, equations = adamw_equations()
    lines = ["AdamW's update of one parameter: the step minillm/optim.py's AdamW takes.", "", header]
    lines += [f"    {line}" for line in equations]
    task = [
        "Your exercise: write adamw_update, these equations as code for one parameter at step t (t = 1 at the",
        "first step). There is no backward pass here: the equations are the whole spec. p, m and v are",
        "updated in place (p[...] = ..., not p = ...): the optimiser keeps these very arrays between steps.",
        commands("adamw"),
    ]
    return (module_docstring(lines, task) + "\nfrom minillm.backend import get_array_module\n\n\n"
            + signature_and_docstring(minillm.optim.adamw_update)
            + blank_body(4, "update p, m and v in place", "adamw"))


def exercise_file(exercise):
    """The text of a fresh exercise file."""
    if exercise.kind == "layer":
        return layer_file(exercise)
    if exercise.kind == "block":
        return block_file()
    return adamw_file()

