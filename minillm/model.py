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

Fine-tuning options. Names in `model.frozen` do not train: backward returns no
gradient for them and skips the work that only they need (a frozen linear layer's
weight gradient; every block below the lowest one with something to train). With
`config.lora_rank` r > 0 the chosen projections get LoRA adapters (layers/lora.py),
`h.{i}.attn.c_attn.lora_a` (C, r) and `.lora_b` (r, 3C) and so on, and every forward
pass uses w + (alpha / r) a @ b in place of their weight w.
"""

import math
from dataclasses import asdict, dataclass, replace

from minillm import backend
from minillm.layers import attention, cross_entropy, dropout, embedding, layernorm, linear, lora, mlp

# The projections each --lora-targets part adapts, in every block.
LORA_TARGETS = {"attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")}


class ConfigError(ValueError):
    """A model configuration that cannot be built."""


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
    lora_targets: str = "attn"  # comma-separated parts of LORA_TARGETS

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be 0 (no adapters) or a positive integer, got {self.lora_rank!r}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be positive, got {self.lora_alpha!r}")
        parts = self.lora_targets.split(",")
        if not parts or any(part not in LORA_TARGETS for part in parts) or len(set(parts)) < len(parts):
            raise ConfigError(
                f"lora_targets must be {' or '.join(LORA_TARGETS)} or both, comma-separated, got {self.lora_targets!r}"
            )

    def to_dict(self):
        return asdict(self)

    def adapted_layers(self):
        """Names of the linear layers with LoRA adapters (none when lora_rank is 0)."""
        if not self.lora_rank:
            return []
        short = [name for part in self.lora_targets.split(",") for name in LORA_TARGETS[part]]
        return [f"h.{i}.{name}" for i in range(self.n_layer) for name in short]


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
    for layer in config.adapted_layers():  # after the rest, so adding adapters keeps the other names' order
        n_in, n_out = shapes[layer + ".weight"]
        shapes[layer + ".lora_a"] = (n_in, config.lora_rank)
        shapes[layer + ".lora_b"] = (config.lora_rank, n_out)
    return shapes


def init_params(config, rng, dtype, names=None):
    """GPT-2 initialisation: weights ~ N(0, 0.02^2), biases 0, LayerNorm gains 1.

    The projections that write into the residual stream (attn.c_proj, mlp.c_proj)
    get std 0.02 / sqrt(2 * n_layer): 2 * n_layer of them add up along the
    residual path, and this keeps the variance of their sum independent of depth.
    LoRA adapters: a ~ N(0, 1 / n_in), so x @ a keeps the scale of x, and b = 0,
    so the adapted weight starts equal to the pretrained one.
    `names` limits the initialisation to those parameters (default: all of them).
    """
    xp = rng.xp
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    params = {}
    for name, shape in parameter_shapes(config).items():
        if names is not None and name not in names:
            continue
        if name.startswith("ln") or ".ln_" in name:
            params[name] = (xp.ones if name.endswith("weight") else xp.zeros)(shape, dtype=dtype)
        elif name.endswith("lora_a"):
            params[name] = rng.normal(shape, 1.0 / math.sqrt(shape[0]), dtype)
        elif name.endswith("bias") or name.endswith("lora_b"):
            params[name] = xp.zeros(shape, dtype=dtype)
        else:
            std = residual_std if name.endswith("c_proj.weight") else 0.02
            params[name] = rng.normal(shape, std, dtype)
    return params


def block_forward(x, params, prefix, n_head, dropout_p, rng, kv_cache=None):
    """One transformer block. Parameters are read as params[prefix + name].

    `kv_cache` (an attention.KVCache) makes x the positions after the cached ones.
    """
    p = lambda name: params.get(prefix + name)  # None for biases the config leaves out
    h, ln_1 = layernorm.forward(x, p("ln_1.weight"), p("ln_1.bias"))
    a, attn = attention.forward(
        h, p("attn.c_attn.weight"), p("attn.c_attn.bias"),
        p("attn.c_proj.weight"), p("attn.c_proj.bias"), n_head, dropout_p, rng, kv_cache,
    )
    a, drop_attn = dropout.forward(a, dropout_p, rng)
    x = x + a
    h, ln_2 = layernorm.forward(x, p("ln_2.weight"), p("ln_2.bias"))
    m, mlp_cache = mlp.forward(
        h, p("mlp.c_fc.weight"), p("mlp.c_fc.bias"), p("mlp.c_proj.weight"), p("mlp.c_proj.bias")
    )
    m, drop_mlp = dropout.forward(m, dropout_p, rng)
    x = x + m
    return x, (ln_1, attn, drop_attn, ln_2, mlp_cache, drop_mlp)


def block_backward(dx, cache, prefix, needed):
    """Gradient of one block: returns (dx_in, {param name: gradient}) for the names in `needed`.

    The attention's and the MLP's weight gradients are computed only when one of
    their parameters is needed: frozen layers pass the gradient on and nothing more.
    """
    ln_1, attn, drop_attn, ln_2, mlp_cache, drop_mlp = cache
    names = lambda *short: [prefix + s for s in short]
    grads = {}

    # x_out = x_mid + dropout(mlp(ln_2(x_mid))): dx flows straight through and through the branch.
    dm = dropout.backward(dx, drop_mlp)
    mlp_names = names("mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")
    dh, *dmlp = mlp.backward(dm, mlp_cache, weight_grads=not needed.isdisjoint(mlp_names))
    grads.update(zip(mlp_names, dmlp))
    dh, *dln = layernorm.backward(dh, ln_2)
    grads.update(zip(names("ln_2.weight", "ln_2.bias"), dln))
    dx = dx + dh

    # x_mid = x_in + dropout(attention(ln_1(x_in))): the same pattern.
    da = dropout.backward(dx, drop_attn)
    attn_names = names("attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias")
    dh, *dattn = attention.backward(da, attn, weight_grads=not needed.isdisjoint(attn_names))
    grads.update(zip(attn_names, dattn))
    dh, *dln = layernorm.backward(dh, ln_1)
    grads.update(zip(names("ln_1.weight", "ln_1.bias"), dln))
    dx = dx + dh
    return dx, {name: g for name, g in grads.items() if g is not None and name in needed}


class GPT:
    """A GPT-2 style language model with hand-written forward and backward passes.

        model = GPT(config, seed=0, dtype="float32", device="cpu")
        logits, loss = model(idx, targets)   # idx, targets: integer (B, T); loss None without targets
        grads = model.backward()             # dict with the keys and shapes of model.params
        model.train() / model.eval()         # dropout on / off

        kv_cache = model.new_kv_cache(B)     # sampling: run the prompt once,
        logits = model.decode(prompt, kv_cache)          # then one token at a time
        logits = model.decode(next_ids[:, None], kv_cache)

        model.frozen = {"wte.weight", ...}   # these get no gradient (and no optimizer state)
        lora_model = model.with_lora(rank=8)  # adapters on the attention projections; only they train
        plain = lora_model.merged()           # adapters folded into the weights: the same logits
    """

    def __init__(self, config, seed=0, dtype="float32", device="cpu", params=None):
        """`params` (name -> array of this dtype on this device) replaces the random initial weights."""
        self.config = config
        self.dtype = backend.dtype_of(dtype)
        self.device = backend.resolve_device(device)
        self.xp = backend.array_module(self.device)
        # One seeded generator on the model's device: first the initial weights, then dropout masks.
        self.rng = backend.RNG(seed, self.device)
        self.params = init_params(config, self.rng, self.dtype) if params is None else params
        self.frozen = set()
        self.training = True
        self._cache = None

    @classmethod
    def from_pretrained(cls, path, dtype="float32", device="cpu"):
        """(model, tokenizer or None) from a Hugging Face GPT-2 directory; see minillm.hf."""
        from minillm import hf  # hf builds GPT models itself: import it when it is used

        return hf.from_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, directory, tokenizer=None):
        """Write config.json + model.safetensors (+ the BPE tokenizer's files); see minillm.hf."""
        from minillm import hf

        hf.save_pretrained(self, directory, tokenizer)

    def train(self, mode=True):
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    def num_params(self):
        """Parameter count; the tied wte is counted once, as in GPT-2's 124M."""
        return sum(int(p.size) for p in self.params.values())

    def trainable_params(self):
        """name -> parameter for every parameter not in self.frozen: what an optimizer should update."""
        return {name: p for name, p in self.params.items() if name not in self.frozen}

    def with_lora(self, rank, alpha=8.0, targets="attn", seed=0):
        """A model with this one's weights plus fresh LoRA adapters, in which only the adapters train.

        The new model shares this one's arrays. Its adapters start with b = 0, so
        its logits equal this model's until they are trained.
        """
        if self.config.lora_rank:
            raise ConfigError("this model already has LoRA adapters; merge them first (model.merged())")
        config = replace(self.config, lora_rank=rank, lora_alpha=alpha, lora_targets=targets)
        adapters = [name for name in parameter_shapes(config) if name not in self.params]
        params = self.params | init_params(config, backend.RNG(seed, self.device), self.dtype, names=adapters)
        model = GPT(config, seed=seed, dtype=self.dtype, device=self.device, params=params)
        model.frozen = set(self.params)
        return model.train(self.training)

    def merged(self):
        """A plain model (no adapters) whose weights are the adapted ones, w + (alpha / r) a @ b.

        It computes the very same weights as the adapted model's forward pass, so
        its logits are identical. Weights without adapters are shared, not copied.
        A model without adapters is returned as it is.
        """
        if not self.config.lora_rank:
            return self
        adapted, _ = self.adapted_params()
        config = replace(self.config, lora_rank=0)
        params = {name: adapted[name] for name in parameter_shapes(config)}
        return GPT(config, dtype=self.dtype, device=self.device, params=params).train(self.training)

    def adapted_params(self):
        """(the parameters a forward pass uses, the LoRA caches): each adapted weight w is replaced
        by lora.forward(w, a, b, alpha / r); without adapters, model.params itself."""
        layers = self.config.adapted_layers()
        if not layers:
            return self.params, {}
        scale = self.config.lora_alpha / self.config.lora_rank
        params, caches = dict(self.params), {}
        for layer in layers:
            w, a, b = (params[f"{layer}.{kind}"] for kind in ("weight", "lora_a", "lora_b"))
            params[f"{layer}.weight"], caches[layer] = lora.forward(w, a, b, scale)
        return params, caches

    def _token_array(self, ids):
        """Integer ids on the model's device (the one host-to-device copy of a batch)."""
        return self.xp.asarray(ids)

    def _checked_tokens(self, idx, targets):
        """idx and targets (or None) checked, then on the model's device.

        The checks come before the copy: a batch from the data arrives on the host,
        where checking costs nothing. Ids already on a GPU are checked there, and
        reading the verdict waits for the GPU to finish its queued work.
        """
        cfg = self.config
        idx = backend.get_array_module(idx).asarray(idx)
        embedding.check_token_ids(idx, cfg.vocab_size, cfg.block_size)
        if targets is None:
            return self._token_array(idx), None
        targets = backend.get_array_module(targets).asarray(targets)
        if targets.shape != idx.shape:
            raise embedding.TokenIdError(
                f"targets shape {tuple(targets.shape)} differs from idx shape {tuple(idx.shape)}"
            )
        # Targets index the logits: out of range, NumPy would read another row and CuPy wrap around.
        outside = (targets != cross_entropy.IGNORE_INDEX) & ((targets < 0) | (targets >= cfg.vocab_size))
        if bool(outside.any()):
            raise embedding.TokenIdError(
                f"targets must lie in [0, {cfg.vocab_size}) or be IGNORE_INDEX ({cross_entropy.IGNORE_INDEX}), "
                f"got {int(targets[outside][0])}"
            )
        return self._token_array(idx), self._token_array(targets)

    def __call__(self, idx, targets=None):
        return self.forward(idx, targets)

    def forward(self, idx, targets=None):
        """logits (B, T, vocab_size) and the mean loss (0-d array), or None without targets."""
        logits, loss, self._cache = self.forward_with_cache(idx, targets, self.rng)
        return logits, loss

    def forward_with_cache(self, idx, targets=None, rng=None):
        """forward() that returns what backward needs instead of keeping it: (logits, loss, cache).

        It changes nothing in the model, so several threads may run it at once on
        different batches, each with its own dropout generator `rng`.
        """
        cfg = self.config
        p, lora_caches = self.adapted_params()
        idx, targets = self._checked_tokens(idx, targets)
        dropout_p = cfg.dropout if self.training else 0.0
        rng = rng if dropout_p > 0.0 else None

        x, emb_cache = embedding.forward(idx, p["wte.weight"], p["wpe.weight"])
        x, emb_drop = dropout.forward(x, dropout_p, rng)
        blocks = []
        for i in range(cfg.n_layer):
            x, block_cache = block_forward(x, p, f"h.{i}.", cfg.n_head, dropout_p, rng)
            blocks.append(block_cache)
        x, ln_f = layernorm.forward(x, p["ln_f.weight"], p.get("ln_f.bias"))
        logits, head = linear.forward(x, p["wte.weight"].T)

        loss = loss_cache = None
        if targets is not None:
            loss, loss_cache = cross_entropy.forward(logits, targets)
        return logits, loss, (emb_cache, emb_drop, blocks, ln_f, head, loss_cache, lora_caches)

    def new_kv_cache(self, batch_size):
        """Empty key/value buffers for decode(): per layer, k and v of shape (B, n_head, block_size, hs)."""
        cfg = self.config
        return [
            attention.KVCache(batch_size, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head, self.dtype, self.xp)
            for _ in range(cfg.n_layer)
        ]

    def decode(self, idx, kv_cache):
        """Logits (B, vocab_size) of the last of the new tokens idx (B, T), given the cached past.

        The kv_cache (from new_kv_cache) holds P positions: 0 for the prompt's
        "prefill", then 1 more after each call. idx are the tokens at positions
        P..P+T-1, so they get the position embeddings wpe[P : P + T]:

            x      = wte[idx] + wpe[P : P + T]
            x      = the blocks of forward(), each attention layer with its own cache
            logits = layernorm_f(x[:, -1]) @ wte^T

        Only the last position's logits are computed: they are all sampling needs,
        and the LM head is the largest matrix product of a decoding step. There is
        no dropout and nothing is kept for backward(). Token ids are not checked
        here (that costs a device sync each step): check a prompt once with
        embedding.check_token_ids; sampled ids are in range by construction.
        A model with LoRA adapters forms its adapted weights at every call: merge
        it first (merged()) to sample quickly.
        """
        cfg, (p, _) = self.config, self.adapted_params()
        idx = self._token_array(idx)
        start, T = kv_cache[0].length, idx.shape[1]
        if start + T > cfg.block_size:
            raise embedding.TokenIdError(
                f"positions up to {start + T} do not fit the model's block_size {cfg.block_size}"
            )
        x = p["wte.weight"][idx] + p["wpe.weight"][start : start + T]
        for i, layer_cache in enumerate(kv_cache):
            x, _ = block_forward(x, p, f"h.{i}.", cfg.n_head, 0.0, None, layer_cache)
        x, _ = layernorm.forward(x[:, -1], p["ln_f.weight"], p.get("ln_f.bias"))
        logits, _ = linear.forward(x, p["wte.weight"].T)
        return logits

    def backward(self, dlogits=None):
        """Gradients of the last forward's loss (or of sum(logits * dlogits)) w.r.t. every parameter."""
        if self._cache is None:
            raise RuntimeError("backward() needs a forward() first")
        cache, self._cache = self._cache, None  # backward uses the cache up
        return self.backward_from_cache(cache, dlogits)

    def backward_from_cache(self, cache, dlogits=None):
        """backward() for a cache from forward_with_cache(); like it, safe to run in several threads.

        Returns the gradients of the trainable parameters only (those not in
        self.frozen), and computes no more than they need: the backward pass stops
        below the lowest block that holds something to train.
        """
        emb_cache, emb_drop, blocks, ln_f, head, loss_cache, lora_caches = cache
        if dlogits is None:
            if loss_cache is None:
                raise RuntimeError("backward() without dlogits needs a forward() with targets")
            dlogits = cross_entropy.backward(1.0, loss_cache)
        needed = self._needed_gradients()
        embeddings_train = "wte.weight" in needed or "wpe.weight" in needed

        grads = {}
        dx, dwte_head, _ = linear.backward(dlogits, head, weight_grads="wte.weight" in needed)
        dx, grads["ln_f.weight"], grads["ln_f.bias"] = layernorm.backward(dx, ln_f)
        lowest = 0 if embeddings_train else min(
            (int(name.split(".")[1]) for name in needed if name.startswith("h.")), default=self.config.n_layer
        )
        # blocks.pop(): each block's activations go as soon as its gradient is done, so memory
        # falls while the gradients grow. The cache is used up: forward again before another backward.
        for i in reversed(range(lowest, self.config.n_layer)):
            dx, block_grads = block_backward(dx, blocks.pop(), f"h.{i}.", needed)
            grads.update(block_grads)
        if embeddings_train:
            dx = dropout.backward(dx, emb_drop)
            dwte_embed, grads["wpe.weight"] = embedding.backward(dx, emb_cache)
            # wte is used twice, as the embedding table and (transposed) as the LM head.
            grads["wte.weight"] = dwte_embed if dwte_head is None else dwte_embed + dwte_head.T
        # An adapted weight's gradient G becomes its adapters' gradients.
        for layer, lora_cache in lora_caches.items():
            if f"{layer}.weight" in grads:
                G = grads.pop(f"{layer}.weight")
                grads[f"{layer}.weight"], grads[f"{layer}.lora_a"], grads[f"{layer}.lora_b"] = lora.backward(G, lora_cache)
        return {name: grads[name] for name in self.params if name not in self.frozen}

    def _needed_gradients(self):
        """Names whose gradients backward must form: the trainable parameters, and each adapted
        weight whose adapters train (lora.backward turns its gradient into theirs)."""
        needed = set(self.trainable_params())
        for layer in self.config.adapted_layers():
            if f"{layer}.lora_a" in needed or f"{layer}.lora_b" in needed:
                needed.add(f"{layer}.weight")
        return needed
