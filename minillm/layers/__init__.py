"""Layers as paired functions, one module each.

Every module has
    forward(inputs..., params...)  -> (out, cache)
    backward(dout, cache)          -> gradients in the order of the differentiable inputs
and a docstring giving the shapes and the equations of both passes.
"""
