"""LoRA: a frozen weight plus a trainable low-rank update (Hu et al., 2021).

Shapes:   w: (n_in, n_out), frozen     a: (n_in, r)     b: (r, n_out)     r << n_in, n_out
          scale = alpha / r (a number)  out: (n_in, n_out), the weight the linear layer then uses

forward:  out = w + scale * a @ b

          A linear layer x @ out then computes x @ w + scale * (x @ a) @ b: the pretrained
          map plus a correction of rank at most r. Training a and b only, r * (n_in + n_out)
          numbers learn instead of n_in * n_out. b starts at zero, so before the first
          step the adapted model is exactly the pretrained one.

backward: with G = dL/dout, the gradient the linear layer returns for its weight (X^T dY),
          out_ij = w_ij + scale * sum_k a_ik b_kj, so
          dw = G                          (a frozen w discards it)
          da = scale * G @ b^T            (d out_ij / d a_ik = scale * b_kj, summed over j)
          db = scale * a^T @ G            (d out_ij / d b_kj = scale * a_ik, summed over i)

Why the weight and not the activations: adapting the weight makes "merging" (folding
the adapters into a plain checkpoint) this very forward pass, so a merged model gives
the adapted model's logits exactly. The price is that each adapted layer still forms
its full weight gradient G; frozen layers without adapters skip theirs.
"""


def forward(w, a, b, scale):
    out = w + scale * (a @ b)
    return out, (a, b, scale)


def backward(dout, cache):
    """Returns (dw, da, db)."""
    a, b, scale = cache
    dw = dout                            # out = w + scale * a @ b
    da = scale * (dout @ b.T)            # out = w + scale * a @ b
    db = scale * (a.T @ dout)            # out = w + scale * a @ b
    return dw, da, db
