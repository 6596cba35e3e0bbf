"""The pictures of minillm.inspect: attention maps and predictions. Needs matplotlib (the `plots` extra)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy  # noqa: E402

from minillm.checkpoint import atomic_write  # noqa: E402

ATTENTION_FILE = "attention.png"
PREDICTIONS_FILE = "predictions.png"
DPI = 80


SHOWN = {" ": "\u2423", "\n": "\u21b5", "\t": "\u2192"}  # a space, a newline and a tab, as signs one can see


def visible(token):
    """A token's text for a label: whitespace as SHOWN, other characters that print nothing escaped (\\x07)."""
    shown = "".join(SHOWN.get(c, c if c.isprintable() else repr(c)[1:-1]) for c in token)
    return shown or "\u2205"


def save(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    plt.close(fig)


def draw_all(found, layer, head, out_dir):
    """attention.png (only `layer` / `head` when given) and predictions.png in out_dir; returns their names."""
    draw_attention(found["attention"], found["tokens"], layer, head, out_dir / ATTENTION_FILE)
    draw_predictions(found, out_dir / PREDICTIONS_FILE)
    return [ATTENTION_FILE, PREDICTIONS_FILE]


def draw_attention(attention, tokens, layer, head, path):
    """A grid of heatmaps, a row per layer and a column per head (or the one layer / head chosen).

    Cell (t, u) of a map is the weight query t gives key u; the future (u > t) is masked
    out by the model and drawn empty (white), so a dark cell is a weight near 0, not a
    position the query could not see.
    """
    n_layer, n_head, T, _ = attention.shape
    layers = range(n_layer) if layer is None else [layer]
    heads = range(n_head) if head is None else [head]
    rows, cols = len(layers), len(heads)
    single = rows == cols == 1
    # A map's side in inches: room for a label per token, within a picture of about 20 inches at most.
    side = max(5.0, 0.25 * T) if single else min(max(1.5, 0.16 * T), 20.0 / max(rows, cols))
    fontsize = min(10.0, 0.75 * side * 72 / T)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols + 1.5, side * rows + 0.8), squeeze=False,
                             layout="constrained")
    labels = [visible(token) for token in tokens]
    rotation = 0 if max(map(len, labels)) <= 2 else 90
    future = numpy.triu(numpy.ones((T, T), dtype=bool), k=1)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    for r, L in enumerate(layers):
        for c, H in enumerate(heads):
            ax = axes[r, c]
            image = ax.imshow(numpy.ma.masked_array(attention[L, H], future), cmap=cmap, vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {L}, head {H}", fontsize=10)
            ax.set_xticks(range(T), labels if single or r == rows - 1 else [], fontsize=fontsize, rotation=rotation)
            ax.set_yticks(range(T), labels if single or c == 0 else [], fontsize=fontsize)
            ax.tick_params(length=0)
    fig.supxlabel("key: the position looked at")
    fig.supylabel("query: the position looking")
    fig.colorbar(image, ax=axes, shrink=0.8 if single else 0.5, label="attention weight")
    save(fig, path)


def draw_predictions(found, path):
    """At each position: a bar for the probability the model gave the token that came, and below it the
    model's best guesses, most likely on top, shaded by probability; the guess that was right is framed."""
    predictions = found["predictions"]
    columns = [*predictions, {"guesses": found["next"]}]  # after the last token: the next one
    width = max(6.0, 0.55 * len(columns) + 1.5)
    fig, (bars, grid) = plt.subplots(2, 1, figsize=(width, 5.2), sharex=True, gridspec_kw={"height_ratios": [1, 1.4]})
    xs = numpy.arange(len(columns))
    bars.bar(xs[:-1], [p["probability"] for p in predictions], color="tab:blue")
    bars.set_ylim(0, 1)
    bars.set_ylabel("p(token that came)")
    mean = "" if found["mean_loss"] is None else f" (mean loss {found['mean_loss']:.3f} nats per token)"
    bars.set_title(f"the probability the model gave each token, before it came{mean}", fontsize=10)
    bars.grid(axis="y", alpha=0.3)

    ranks = len(found["next"])
    probability = numpy.array([[g["probability"] for g in column["guesses"]] for column in columns]).T
    grid.imshow(probability, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    for x, column in enumerate(columns):
        for rank, guess in enumerate(column["guesses"]):
            dark = guess["probability"] > 0.6
            grid.text(x, rank, visible(guess["token"]), ha="center", va="center", fontsize=8,
                      color="white" if dark else "black")
            if guess["id"] == column.get("id"):
                grid.add_patch(plt.Rectangle((x - 0.5, rank - 0.5), 1, 1, fill=False, edgecolor="tab:red", lw=1.5))
    grid.set_yticks(range(ranks), [f"guess {rank + 1}" for rank in range(ranks)], fontsize=8)
    grid.set_xticks(xs, [visible(p["token"]) for p in predictions] + ["next"], fontsize=8)
    grid.set_xlabel("the token that came (framed in red where a guess got it)")
    fig.tight_layout()
    save(fig, path)
