"""Independent numpy references for the tests: transforms, kernels and convolution.

Nothing here imports the library: these are the package's contract written
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


# ----------------------------------------------------------------------------
# The learned families, written out tap by tap


def bilinear(base, x, y):
    """The value of a 2-D array at the point (x, y) of centred tap coordinates.

    Tap (i, j) sits at x = j - (kw - 1) / 2, y = i - (kh - 1) / 2; the array is
    zero outside its grid, and linear in between (bilinear interpolation).
    """
    kh, kw = base.shape
    gx, gy = x + (kw - 1) / 2.0, y + (kh - 1) / 2.0
    total = 0.0
    for i in range(kh):
        for j in range(kw):
            weight = max(0.0, 1.0 - abs(gx - j)) * max(0.0, 1.0 - abs(gy - i))
            total += weight * base[i, j]
    return total


def learned_operator(family, params, kernel_size):
    """The family's learned tap operator L (taps x taps), built column by column."""
    kh, kw = kernel_size
    taps = kh * kw
    params = np.asarray(params, np.float64)
    if family == "scalar":
        return np.diag(params)
    if family == "general":
        return params.reshape(taps, taps)
    if family == "rotation":
        theta = params[0]
        matrix = np.array([[np.cos(theta), -np.sin(theta), 0.0],
                           [np.sin(theta), np.cos(theta), 0.0]])
    else:
        matrix = params.reshape(2, 3)
    out = np.zeros((taps, taps))
    for v in range(taps):  # column v: the operator applied to the unit tap v
        unit = np.zeros(taps)
        unit[v] = 1.0
        unit = unit.reshape(kh, kw)
        for u in range(taps):
            i, j = divmod(u, kw)
            x, y = j - (kw - 1) / 2.0, i - (kh - 1) / 2.0
            px = matrix[0, 0] * x + matrix[0, 1] * y + matrix[0, 2]
            py = matrix[1, 0] * x + matrix[1, 1] * y + matrix[1, 2]
            out[u, v] = bilinear(unit, px, py)
    if family == "rotation":
        out = out * params[1]  # the amplitude
    return out


def transform_kernel(base, family, params):
    """T (the discrete transform already applied) -> L @ T on the taps of every channel."""
    kh, kw = base.shape[:2]
    operator = learned_operator(family, params, (kh, kw))
    flat = base.reshape(kh * kw, -1)
    return (operator @ flat).reshape(base.shape)


def learned_operators(family, params, kernel_size):
    """`learned_operator` for every (group, output): `(g, f, taps, taps)`, or None (discrete)."""
    if family == "discrete":
        return None
    groups, filters = params.shape[:2]
    return np.array([[learned_operator(family, params[g, o], kernel_size)
                      for o in range(filters)] for g in range(groups)])


def materialize_learned(base, assignment, names, family, params, scale=None, operators=None):
    """Like `materialize`, with every output's learned operator `params[g, o]` applied
    (or the given `operators` `(g, f, taps, taps)`)."""
    kh, kw, c_in, _ = base.shape
    groups, filters, _ = assignment.shape
    cg = c_in // groups
    if operators is None:
        operators = learned_operators(family, params, (kh, kw))
    kernel = np.zeros((kh, kw, c_in, filters), np.float64)
    for g in range(groups):
        channels = slice(g * cg, (g + 1) * cg)
        for o in range(filters):
            b, t = assignment[g, o]
            moved = TRANSFORMS[names[t]](base[:, :, channels, b])
            if operators is not None:
                moved = (operators[g, o] @ moved.reshape(kh * kw, -1)).reshape(moved.shape)
            kernel[:, :, channels, o] = moved
    if scale is not None:
        kernel = kernel * scale
    return kernel
