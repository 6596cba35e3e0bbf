"""Training health per parameter group, for train.py --log-layers: gradient norms and update/weight ratios.

A group is a part of the model as one reads it: each block's attention (c_attn, c_proj),
MLP (c_fc, c_proj) and LayerNorms (ln_1, ln_2); the token and position embeddings (wte,
which is also the LM head, and wpe); the final LayerNorm (ln_f). LoRA adapters belong to
the layer they adapt. For a group with trainable parameters p_i, gradients g_i and the
optimizer step's change dp_i, at each logged step:

    grad_norm    = sqrt(sum_i |g_i|^2)                           before clipping, as the log's grad_norm
    update_ratio = sqrt(sum_i |dp_i|^2) / sqrt(sum_i |p_i|^2)     p as it was before the step

What to look for: gradient norms that shrink block by block towards the input are gradients
vanishing on their way down; an update/weight ratio far below the others is a group that
barely learns, one of 1e-1 or more rewrites a tenth of its weights each step (the learning
rate is too high for it). Courses quote about 1e-3 as a healthy ratio for plain SGD; AdamW
moves each weight by about the learning rate, so early in training its ratios sit higher.

LayerWatch looks at the logged steps only: train_step calls it on either side of the optimizer's
own update, which it measures without changing a number, so a run with --log-layers takes exactly
the steps of one without it, and a run without it never builds one.
"""

import math

from minillm import backend
from minillm.checkpoint import atomic_write
from minillm.progress import entries_with, pyplot

PLOT_FILE = "layers.png"
KINDS = {"attn": "attention", "mlp": "MLP", "ln": "LayerNorms"}  # the block's groups, as the picture titles them


def group_of(name):
    """The group of a parameter: 'h.3.attn.c_proj.weight' -> 'h.3.attn', 'h.3.ln_2.bias' -> 'h.3.ln',
    'wte.weight' -> 'wte', 'ln_f.weight' -> 'ln_f'."""
    parts = name.split(".")
    if parts[0] != "h":
        return parts[0]
    return f"h.{parts[1]}." + ("ln" if parts[2].startswith("ln_") else parts[2])


class LayerWatch:
    """The optimizer's update of `params` (name -> the arrays it updates in place), measured per group.

    train_step calls before_update(grads) just before the optimizer's step and after_update(grads)
    just after it. They measure on the device and read nothing back; report() reads the
    measurement of the last step (a device sync: call it where the loop syncs anyway, at a log line).
    """

    def __init__(self, params):
        self.params = params
        self.before = None  # name -> a copy of the parameter as the update found it
        self.sums = None

    def before_update(self, grads):
        """Keep a copy of each parameter that `grads` is about to update."""
        self.before = {name: self.params[name].copy() for name in grads}

    def after_update(self, grads):
        """Measure each group's gradients, weights before the update, and the update itself."""
        before, self.before = self.before, None
        sums = {}  # group -> [sum g^2, sum p^2, sum dp^2], 0-d arrays on the device
        for name, g in grads.items():
            change = self.params[name] - before[name]
            terms = ((g * g).sum(), (before[name] * before[name]).sum(), (change * change).sum())
            group = sums.setdefault(group_of(name), [0.0, 0.0, 0.0])
            for i, term in enumerate(terms):
                group[i] = group[i] + term
        self.sums = sums

    def report(self, grad_norm, grad_clip):
        """{"layers": {group: {"grad_norm", "update_ratio"}}} of the last step, as Python floats.

        The optimizer saw the clipped gradients; clipping scaled every group by the same
        min(1, grad_clip / (grad_norm + 1e-6)) (optim.clip_grad_norm), divided out here.
        update_ratio is None for a group whose weights were all 0.
        """
        norm = backend.to_float(grad_norm)
        scale = min(1.0, grad_clip / (norm + 1e-6)) if grad_clip else 1.0
        layers = {}
        for group, (grad_sq, weight_sq, update_sq) in self.sums.items():
            grad_sq, weight_sq, update_sq = map(backend.to_float, (grad_sq, weight_sq, update_sq))
            layers[group] = {
                "grad_norm": math.sqrt(grad_sq) / scale,
                "update_ratio": math.sqrt(update_sq / weight_sq) if weight_sq > 0 else None,
            }
        return {"layers": layers}


def read_layers(log_path):
    """{step: {group: {"grad_norm", "update_ratio"}}} from the log's --log-layers entries."""
    return {step: entry["layers"] for step, entry in entries_with(log_path, "layers").items()}


def plot_layers(log_path, png_path):
    """layers.png: gradient norm (top) and update/weight ratio (bottom) against step, a column per kind of group.

    Returns False when matplotlib is missing or the log has no --log-layers entries yet.
    """
    plt = pyplot()
    if plt is None:
        return False
    found = read_layers(log_path)
    if not found:
        return False
    steps = sorted(found)
    groups = list(found[steps[-1]])
    blocks = sorted({int(g.split(".")[1]) for g in groups if g.startswith("h.")})
    columns = [(title, [g for g in groups if g.startswith("h.") and g.endswith("." + kind)])
               for kind, title in KINDS.items()]
    columns.append(("embeddings, final LayerNorm", [g for g in groups if not g.startswith("h.")]))
    columns = [(title, members) for title, members in columns if members]
    fig, axes = plt.subplots(2, len(columns), figsize=(3.6 * len(columns), 6.0), sharex=True, squeeze=False)
    colours = plt.get_cmap("viridis")
    for c, (title, members) in enumerate(columns):
        for row, (key, label) in enumerate((("grad_norm", "gradient norm"), ("update_ratio", "update / weight"))):
            ax = axes[row, c]
            for g in members:
                points = [(s, found[s][g][key]) for s in steps if g in found[s] and found[s][g][key]]
                if not points:
                    continue
                block = int(g.split(".")[1]) if g.startswith("h.") else None
                # viridis up to 0.85: its last yellows are too pale on white
                colour = colours(0.85 * blocks.index(block) / max(1, len(blocks) - 1)) if block is not None else None
                ax.plot(*zip(*points), color=colour, lw=1.2, label=f"block {block}" if block is not None else g)
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            if row == 0:
                ax.set_title(title, fontsize=10)
            else:
                ax.axhline(1e-3, color="grey", ls="--", lw=0.8)
                ax.set_xlabel("step")
            if c == 0:
                ax.set_ylabel(label)
        axes[0, c].legend(fontsize=7)
    fig.suptitle("per group: gradient norm before clipping, and the step's update over the weights "
                 "(dashed: 1e-3)", fontsize=10)
    fig.tight_layout()
    atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=80))
    plt.close(fig)
    return True
