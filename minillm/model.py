"""The GPT: GPT-2's architecture composed from the layer functions.

    x      = dropout(wte[idx] + wpe[:T])                    embedding
    for each of the n_layer blocks (pre-LayerNorm, residual):
        x  = x + dropout(attention(layernorm_1(x)))
        x  = x + dropout(mlp(layernorm_2(x)))
    logits = layernorm_f(x) @ wte^T                         LM head tied to the embedding
    loss   = cross_entropy(logits, targets)

The backward pass walks the same steps in reverse. A residual x + f(x) sends
its incoming gradient both straight through and into f, so the two are added.
The tied matrix wte is used twice, so its gradient is the sum of both uses.

For sampling, `decode` runs the same blocks on new positions only, with each
attention layer's keys and values of the earlier positions kept in a KV cache
(see layers/attention.py), and returns the logits of the last position.

Parameters live in one place, the dict `model.params`, under GPT-2's names
(`h.0.attn.c_attn.weight`, ...), with every weight stored input-by-output.

Two readings of every layer compute the same numbers: `minillm.layers`, the equations as written, and
`minillm.fast`, tuned for speed. The model runs on the fast layers; GPT(..., reference=True) on the
reference, and GPT(..., layers=L) on any namespace L of modules with their signatures (minillm/exercises).

Fine-tuning (frozen parameters, LoRA adapters: minillm/finetune.py) reaches forward and backward
through one object, a finetune.Tuning. A configuration and token ids are checked in checks.py.
"""

import copy
import math
from dataclasses import asdict, dataclass, replace

import minillm.fast
import minillm.layers
from minillm import backend, checks, finetune, memory


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True  # biases in the linear layers and LayerNorms, as GPT-2
    lora_rank: int = 0  # 0: no adapters
    lora_alpha: float = 8.0  # the adapters' update is scaled by lora_alpha / lora_rank
    lora_targets: str = "attn"  # comma-separated parts of finetune.LORA_TARGETS

    def __post_init__(self):
        checks.check_config(vars(self))

    def to_dict(self):
        return asdict(self)


def parameter_shapes(config):
    """name -> shape for every parameter, in GPT-2's naming and order."""
    C = config.n_embd
    shapes = {"wte.weight": (config.vocab_size, C), "wpe.weight": (config.block_size, C)}

    def add(name, n_in, n_out=None):
        """A LayerNorm (n_out None) or a linear layer, with its bias when the config has them."""
        shapes[name + ".weight"] = (n_in,) if n_out is None else (n_in, n_out)
        if config.bias:
            shapes[name + ".bias"] = (n_in if n_out is None else n_out,)

    for i in range(config.n_layer):
        add(f"h.{i}.ln_1", C)
        add(f"h.{i}.attn.c_attn", C, 3 * C)
        add(f"h.{i}.attn.c_proj", C, C)
        add(f"h.{i}.ln_2", C)
        add(f"h.{i}.mlp.c_fc", C, 4 * C)
        add(f"h.{i}.mlp.c_proj", 4 * C, C)
    add("ln_f", C)
    # After the rest, so adding adapters keeps the other names' order.
    return shapes | finetune.adapter_shapes(config, shapes)


def init_params(config, rng, dtype):
    """GPT-2 initialisation: weights ~ N(0, 0.02^2), biases 0, LayerNorm gains 1.

    The projections that write into the residual stream (attn.c_proj, mlp.c_proj)
    get std 0.02 / sqrt(2 * n_layer): 2 * n_layer of them add up along the
    residual path, and this keeps the variance of their sum independent of depth.
    LoRA adapters, when the config has them, come last (finetune.init_adapters).
    """
    memory.check_model_fits(config, backend.dtype_of(dtype).itemsize, parameter_shapes)
    xp = rng.xp
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    params = {}
    for name, shape in parameter_shapes(replace(config, lora_rank=0)).items():
        if name.startswith("ln") or ".ln_" in name:
            params[name] = (xp.ones if name.endswith("weight") else xp.zeros)(shape, dtype=dtype)
        elif name.endswith("bias"):
            params[name] = xp.zeros(shape, dtype=dtype)
        else:
            std = residual_std if name.endswith("c_proj.weight") else 0.02
            params[name] = rng.normal(shape, std, dtype)
    return params | finetune.init_adapters(config, params, rng, dtype)


def block_forward(layers, x, w, prefix, n_head, dropout_p, rng, kv_cache=None, keep_weights=None):
    """One transformer block on the layer functions of `layers`; its weights are w[prefix + name].

    `kv_cache` (an attention.KVCache) makes x the positions after the cached ones;
    `keep_weights` (a list) gets the block's attention weights appended.
    """
    p = lambda name: w.get(prefix + name)  # None for biases the config leaves out
    h, ln_1 = layers.layernorm.forward(x, p("ln_1.weight"), p("ln_1.bias"))
    a, attn = layers.attention.forward(
        h, p("attn.c_attn.weight"), p("attn.c_attn.bias"),
        p("attn.c_proj.weight"), p("attn.c_proj.bias"), n_head, dropout_p, rng, kv_cache, keep_weights,
    )
    a, drop_attn = layers.dropout.forward(a, dropout_p, rng)
    x = x + a
    h, ln_2 = layers.layernorm.forward(x, p("ln_2.weight"), p("ln_2.bias"))
    m, mlp = layers.mlp.forward(
        h, p("mlp.c_fc.weight"), p("mlp.c_fc.bias"), p("mlp.c_proj.weight"), p("mlp.c_proj.bias")
    )
    m, drop_mlp = layers.dropout.forward(m, dropout_p, rng)
    x = x + m
    return x, (ln_1, attn, drop_attn, ln_2, mlp, drop_mlp)


def block_backward(layers, dx, cache, prefix, tuning):
    """Gradient of one block: (dx_in, {weight name: gradient}), the forward's steps in reverse.

    A projection's weight gradients are formed only when `tuning` wants one of them: a
    frozen layer passes the gradient on and does nothing more.
    """
    ln_1, attn, drop_attn, ln_2, mlp, drop_mlp = cache
    names = lambda *short: [prefix + s for s in short]
    grads = {}

    # x_out = x_mid + dropout(mlp(ln_2(x_mid))): dx flows straight through and through the branch.
    dm = layers.dropout.backward(dx, drop_mlp)
    mlp_names = names("mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")
    dh, *dmlp = layers.mlp.backward(dm, mlp, weight_grads=tuning.wants(*mlp_names))
    grads.update(zip(mlp_names, dmlp))
    dh, *dln = layers.layernorm.backward(dh, ln_2)
    grads.update(zip(names("ln_2.weight", "ln_2.bias"), dln))
    dx = dx + dh

    # x_mid = x_in + dropout(attention(ln_1(x_in))): the same pattern.
    da = layers.dropout.backward(dx, drop_attn)
    attn_names = names("attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias")
    dh, *dattn = layers.attention.backward(da, attn, weight_grads=tuning.wants(*attn_names))
    grads.update(zip(attn_names, dattn))
    dh, *dln = layers.layernorm.backward(dh, ln_1)
    grads.update(zip(names("ln_1.weight", "ln_1.bias"), dln))
    dx = dx + dh
    return dx, grads


class GPT:
    """A GPT-2 style language model with hand-written forward and backward passes.

        model = GPT(config, seed=0, dtype="float32", device="cpu")
        logits, loss = model(idx, targets)   # idx, targets: integer (B, T); loss None without targets
        grads = model.backward()             # dict with the keys and shapes of model.params
        model.train() / model.eval()         # dropout on / off (eval also keeps nothing for backward)
        model.layers                         # the layer modules it runs on (default: minillm.fast)
        model.reference = True               # run on minillm.layers, the reference (False: minillm.fast again)
        model.keep_attention = True          # forward() keeps model.attention_weights: [P of each block] (inspect.py)

        kv_cache = model.new_kv_cache(B)     # sampling: run the prompt once,
        logits = model.decode(prompt, kv_cache)          # then one token at a time
        logits = model.decode(next_ids[:, None], kv_cache)

        model.frozen = {"wte.weight", ...}   # no gradient; trainable_params() leaves them out (minillm/finetune.py)
    """

    def __init__(self, config, seed=0, dtype="float32", device="cpu", params=None, reference=False, layers=None):
        """`params` (name -> array of this dtype on this device) replaces the random initial weights;
        `layers` (a namespace of layer modules, as minillm.layers) replaces the ones `reference` picks."""
        self.config = config
        self.dtype = backend.dtype_of(dtype)
        self.device = backend.resolve_device(device)
        self.xp = backend.array_module(self.device)
        # One seeded generator on the model's device: first the initial weights, then dropout masks.
        self.rng = backend.RNG(seed, self.device)
        self.params = init_params(config, self.rng, self.dtype) if params is None else params
        self.layers = layers or (minillm.layers if reference else minillm.fast)
        self.frozen = set()
        self.training = True
        self._cache = None
        self.keep_attention = False  # off: forward() keeps no attention weights, attention_weights stays None
        self.attention_weights = None

    @property
    def reference(self):
        """Whether the model runs on minillm.layers, the reference; setting it picks those or minillm.fast."""
        return self.layers is minillm.layers

    @reference.setter
    def reference(self, reference):
        self.layers = minillm.layers if reference else minillm.fast

    def train(self, mode=True):
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    def reseed(self, seed):
        """Draw the next dropout masks from a generator seeded with `seed`."""
        self.rng = backend.RNG(seed, self.device)

    def replica(self):
        """A model on these very parameters with its own forward cache and dropout generator (parallel.py)."""
        twin = copy.copy(self)
        twin._cache = None
        return twin

    def num_params(self):
        """Parameter count; the tied wte is counted once, as in GPT-2's 124M."""
        return sum(int(p.size) for p in self.params.values())

    def trainable_params(self):
        """name -> parameter for every parameter not in self.frozen: what an optimizer should update."""
        return {name: p for name, p in self.params.items() if name not in self.frozen}

    def __call__(self, idx, targets=None):
        return self.forward(idx, targets)

    def forward(self, idx, targets=None):
        """logits (B, T, vocab_size) and the mean loss (0-d array), or None without targets.

        In training mode it keeps what backward() needs; in eval mode nothing (evaluation
        and sampling want no gradients, and kept activations would add to the next step's peak).
        """
        cfg, layers = self.config, self.layers
        idx, targets = checks.token_batch(idx, targets, cfg, self.xp)
        tuning = finetune.Tuning(self)
        w = tuning.weights
        dropout_p = cfg.dropout if self.training else 0.0
        rng = self.rng if dropout_p > 0.0 else None

        x, embed = layers.embedding.forward(idx, w["wte.weight"], w["wpe.weight"])
        x, embed_drop = layers.dropout.forward(x, dropout_p, rng)
        blocks = []
        kept = [] if self.keep_attention else None
        for i in range(cfg.n_layer):
            x, block = block_forward(layers, x, w, f"h.{i}.", cfg.n_head, dropout_p, rng, keep_weights=kept)
            blocks.append(block)
        self.attention_weights = kept
        x, ln_f = layers.layernorm.forward(x, w["ln_f.weight"], w.get("ln_f.bias"))
        logits, head = layers.linear.forward(x, w["wte.weight"].T)
        loss = loss_cache = None
        if targets is not None:
            loss, loss_cache = layers.cross_entropy.forward(logits, targets)

        self._cache = (embed, embed_drop, blocks, ln_f, head, loss_cache, tuning) if self.training else None
        return logits, loss

    def backward(self, dlogits=None):
        """Gradients of the last forward's loss (or of sum(logits * dlogits)): {name: array} for every
        parameter not frozen. The same steps as forward, in reverse; the forward's cache is used up."""
        if self._cache is None:
            raise RuntimeError("backward() needs a forward() in training mode (model.train()) first")
        (embed, embed_drop, blocks, ln_f, head, loss_cache, tuning), self._cache = self._cache, None
        layers, grads = self.layers, {}
        if dlogits is None:
            if loss_cache is None:
                raise RuntimeError("backward() without dlogits needs a forward() with targets")
            dlogits = layers.cross_entropy.backward(1.0, loss_cache)

        dx, dwte_head, _ = layers.linear.backward(dlogits, head, weight_grads=tuning.wants("wte.weight"))
        dx, grads["ln_f.weight"], grads["ln_f.bias"] = layers.layernorm.backward(dx, ln_f)
        # A learner's layer set (minillm/exercises) brings its own block_backward; layers and fast use this one.
        backward_block = getattr(layers, "block_backward", block_backward)
        # Below tuning.lowest_block nothing trains, so backward stops there. blocks.pop(): each
        # block's activations go as soon as its gradient is done, so memory falls while the gradients grow.
        for i in reversed(range(tuning.lowest_block, self.config.n_layer)):
            dx, block_grads = backward_block(layers, dx, blocks.pop(), f"h.{i}.", tuning)
            grads.update(block_grads)
        if tuning.wants("wte.weight", "wpe.weight"):
            dx = layers.dropout.backward(dx, embed_drop)
            dwte_embed, grads["wpe.weight"] = layers.embedding.backward(dx, embed)
            # wte is used twice, as the embedding table and (transposed) as the LM head.
            grads["wte.weight"] = dwte_embed if dwte_head is None else dwte_embed + dwte_head.T
        return tuning.gradients(grads)

    def new_kv_cache(self, batch_size):
        """Empty key/value buffers for decode(): per layer, k and v of shape (B, n_head, block_size, hs)."""
        cfg, hs = self.config, self.config.n_embd // self.config.n_head
        return [self.layers.attention.KVCache(batch_size, cfg.n_head, cfg.block_size, hs, self.dtype, self.xp)
                for _ in range(cfg.n_layer)]

    def decode(self, idx, kv_cache):
        """Logits (B, vocab_size) of the last of the new tokens idx (B, T), given the cached past.

        The kv_cache (from new_kv_cache) holds P positions: 0 for the prompt's "prefill", then 1 more
        after each call. idx are the tokens at positions P..P+T-1, so they get wpe[P : P + T]:

            x      = wte[idx] + wpe[P : P + T]
            x      = the blocks of forward(), each attention layer with its own cache
            logits = layernorm_f(x[:, -1]) @ wte^T

        Only the last position's logits are computed: they are all sampling needs, and the LM head is
        the largest matrix product of a decoding step. There is no dropout and nothing is kept for
        backward(). Token ids are not checked here (that costs a device sync each step): check a prompt
        once with embedding.check_token_ids; sampled ids are in range by construction.
        """
        cfg, layers = self.config, self.layers
        w, _ = finetune.adapted_weights(cfg, self.params)
        idx = self.xp.asarray(idx)
        start, T = kv_cache[0].length, idx.shape[1]
        checks.check_context(start + T, cfg.block_size)
        x = w["wte.weight"][idx] + w["wpe.weight"][start : start + T]
        for i, layer_cache in enumerate(kv_cache):
            x, _ = block_forward(layers, x, w, f"h.{i}.", cfg.n_head, 0.0, None, layer_cache)
        x, _ = layers.layernorm.forward(x[:, -1], w["ln_f.weight"], w.get("ln_f.bias"))
        logits, _ = layers.linear.forward(x, w["wte.weight"].T)
        return logits
