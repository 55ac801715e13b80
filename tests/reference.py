"""Independent numpy references for the tests: transforms, kernels and convolution.

Nothing here imports the library: these are the contract of DESIGN.md written
out directly, against which the layer is checked.
"""

import numpy as np

TRANSFORMS = {
    "identity": lambda b: b,
    "rot90": lambda b: np.rot90(b, 1, axes=(0, 1)),
    "rot180": lambda b: np.rot90(b, 2, axes=(0, 1)),
    "rot270": lambda b: np.rot90(b, 3, axes=(0, 1)),
    "flip_h": lambda b: np.flip(b, axis=1),
    "flip_v": lambda b: np.flip(b, axis=0),
    "transpose": lambda b: np.swapaxes(b, 0, 1),
    "antitranspose": lambda b: np.rot90(np.swapaxes(b, 0, 1), 2, axes=(0, 1)),
    "shift_up": lambda b: np.concatenate([b[1:], np.zeros_like(b[:1])], axis=0),
    "shift_down": lambda b: np.concatenate([np.zeros_like(b[:1]), b[:-1]], axis=0),
    "shift_left": lambda b: np.concatenate([b[:, 1:], np.zeros_like(b[:, :1])], axis=1),
    "shift_right": lambda b: np.concatenate([np.zeros_like(b[:, :1]), b[:, :-1]], axis=1),
}
SQUARE_ONLY = frozenset({"rot90", "rot270", "transpose", "antitranspose"})


def materialize(base, assignment, names, scale=None):
    """W[..., g-th channel group, o] = scale[o] * T_{t_g(o)}(B[..., group, b_g(o)])."""
    kh, kw, c_in, _ = base.shape
    groups, filters, _ = assignment.shape
    cg = c_in // groups
    kernel = np.zeros((kh, kw, c_in, filters), np.float64)
    for g in range(groups):
        channels = slice(g * cg, (g + 1) * cg)
        for o in range(filters):
            b, t = assignment[g, o]
            kernel[:, :, channels, o] = TRANSFORMS[names[t]](base[:, :, channels, b])
    if scale is not None:
        kernel = kernel * scale
    return kernel


def conv2d(x, kernel, bias=None, strides=(1, 1), padding="valid", dilation=(1, 1)):
    """Direct NHWC convolution in float64, TensorFlow's padding convention."""
    x = np.asarray(x, np.float64)
    kh, kw, _, filters = kernel.shape
    (sh, sw), (dh, dw) = strides, dilation
    _, h, w, _ = x.shape
    if padding == "same":
        oh, ow = -(-h // sh), -(-w // sw)
        ph = max((oh - 1) * sh + (kh - 1) * dh + 1 - h, 0)
        pw = max((ow - 1) * sw + (kw - 1) * dw + 1 - w, 0)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    else:
        oh = (h - (kh - 1) * dh - 1) // sh + 1
        ow = (w - (kw - 1) * dw - 1) // sw + 1
    out = np.zeros((x.shape[0], oh, ow, filters))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i * dh : i * dh + (oh - 1) * sh + 1 : sh, j * dw : j * dw + (ow - 1) * sw + 1 : sw]
            out += patch @ kernel[i, j]
    if bias is not None:
        out += bias
    return out
