"""Plain reference for the IBP patch certificate (Chiang et al. 2020, Eq. 5 to 9 and 11), written with loops.

For one frame, one rectangle: every location in turn; the box built pixel by pixel (inside the patch the
normalized images of pixel values 0 and 1, elsewhere the frame); interval bounds propagated in float64 layer by
layer with the positive/negative split of the weights (lower = W+ lo + W- hi + b, the same interval as the
paper's center/radius form), convolutions as sums over their windows, ReLU and Flatten elementwise; the last
layer merged with (e_i - e_j). The certificate: min over locations and j != label of lower(z_label - z_j) minus
the tolerance, > 0 when certified (the units of ``certinfer.runtime.defenses.ibp.certify``).

:func:`reference` runs this on the network rebuilt from the bundle's torch bounds entry, against the runtime's
whole certificate (its bounds engine included: the bounds are the math); margins agree to float32 rounding.
"""

from __future__ import annotations

import numpy as np

from certinfer.bench.reference import plain_reference
from certinfer.runtime.defenses import defense
from certinfer.runtime.defenses.ibp import IBPCertifier
from certinfer.runtime.verdict import Certificate, RectCert
from certinfer.threat import rect_key

Layer = tuple  # ("conv", W, b, stride, padding) | ("linear", W, b) | ("relu",) | ("flatten",)


def layers_of(module) -> list[Layer]:
    """The layers of an ``IBPNet`` (its ``layers`` Sequential) as float64 arrays."""
    out = []
    for layer in module.layers:
        name = type(layer).__name__
        if name == "Conv2d":
            out.append(("conv", layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy(),
                        layer.stride[0], layer.padding[0]))
        elif name == "Linear":
            out.append(("linear", layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()))
        elif name in ("ReLU", "Flatten"):
            out.append((name.lower(),))
        else:
            raise TypeError(f"no reference for layer {name}")
    return out


def _conv_bounds(lo, hi, weight, bias, stride, pad):
    c_out, _, k, _ = weight.shape
    lo_p, hi_p = (np.pad(a, ((0, 0), (pad, pad), (pad, pad))) for a in (lo, hi))
    h_out, w_out = (lo_p.shape[1] - k) // stride + 1, (lo_p.shape[2] - k) // stride + 1
    pos, neg = np.maximum(weight, 0), np.minimum(weight, 0)
    out_lo, out_hi = np.zeros((c_out, h_out, w_out)), np.zeros((c_out, h_out, w_out))
    for o in range(c_out):
        for i in range(h_out):
            for j in range(w_out):
                win_lo = lo_p[:, i * stride:i * stride + k, j * stride:j * stride + k]
                win_hi = hi_p[:, i * stride:i * stride + k, j * stride:j * stride + k]
                out_lo[o, i, j] = np.sum(pos[o] * win_lo) + np.sum(neg[o] * win_hi) + bias[o]
                out_hi[o, i, j] = np.sum(pos[o] * win_hi) + np.sum(neg[o] * win_lo) + bias[o]
    return out_lo, out_hi


def _linear_bounds(lo, hi, weight, bias):
    pos, neg = np.maximum(weight, 0), np.minimum(weight, 0)
    return pos @ lo + neg @ hi + bias, pos @ hi + neg @ lo + bias


def margin_bounds_reference(layers: list[Layer], lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(K, K) lower bounds of z_i - z_j over the box [lo, hi] (C, H, W), last layer merged with e_i - e_j."""
    lo, hi = lo.astype(np.float64), hi.astype(np.float64)
    for layer in layers[:-1]:
        if layer[0] == "conv":
            lo, hi = _conv_bounds(lo, hi, *layer[1:])
        elif layer[0] == "linear":
            lo, hi = _linear_bounds(lo, hi, *layer[1:])
        elif layer[0] == "relu":
            lo, hi = np.maximum(lo, 0), np.maximum(hi, 0)
        else:
            lo, hi = lo.reshape(-1), hi.reshape(-1)
    _, weight, bias = layers[-1]
    k = len(bias)
    out = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            d = weight[i] - weight[j]
            out[i, j] = np.sum(np.maximum(d, 0) * lo) + np.sum(np.minimum(d, 0) * hi) + bias[i] - bias[j]
    return out


def box_reference(x: np.ndarray, rect: tuple[int, int], top: int, left: int, patch_lo: np.ndarray,
                  patch_hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The box of one patch location on a normalized frame (C, H, W), pixel by pixel."""
    lo, hi = x.astype(np.float64).copy(), x.astype(np.float64).copy()
    for c in range(x.shape[0]):
        for i in range(top, top + rect[0]):
            for j in range(left, left + rect[1]):
                lo[c, i, j], hi[c, i, j] = patch_lo[c], patch_hi[c]
    return lo, hi


def min_margins_reference(layers: list[Layer], x: np.ndarray, rect: tuple[int, int], patch_lo: np.ndarray,
                          patch_hi: np.ndarray) -> np.ndarray:
    """(K, K) lower bounds minimized over every location of ``rect`` on one frame."""
    best = None
    for top in range(x.shape[1] - rect[0] + 1):
        for left in range(x.shape[2] - rect[1] + 1):
            m = margin_bounds_reference(layers, *box_reference(x, rect, top, left, patch_lo, patch_hi))
            best = m if best is None else np.minimum(best, m)
    return best


def certificate_reference(min_margins: np.ndarray, label: int, tolerance: float) -> tuple[bool, float]:
    """(certified, margin): the smallest lower(z_label - z_j) over j != label, minus the tolerance."""
    worst = min(min_margins[label, j] for j in range(len(min_margins)) if j != label)
    return bool(worst - tolerance > 0), float(worst - tolerance)


def bundle_layers(certifier: IBPCertifier) -> list[Layer]:
    """The layers of the network behind the bundle's bounds engine, from its torch entry (safetensors)."""
    from safetensors.torch import load

    entry = next((e for e in certifier.bundle.engines("bounds") if e["format"] == "torch"), None)
    if entry is None:
        raise ValueError("ibp bundle: no torch bounds entry to rebuild the network from (certinfer export torch)")
    net = defense(certifier.name).load("builder")(entry["config"])
    net.load_state_dict(load(certifier.bundle.read(entry)))
    return layers_of(net)


@plain_reference(margin_rtol=1e-3, engine_is_math=True)
def reference(certifier: IBPCertifier, frames: np.ndarray) -> list[Certificate]:
    """IBP's certificates from float64 interval bounds, looping over locations, pixels, convolution windows and
    class pairs (the label: the model engine's argmax)."""
    layers = bundle_layers(certifier)
    x = certifier.prepare(frames)
    labels = certifier.logits(x).argmax(axis=1)
    out = []
    for frame, label in zip(x, labels):
        per_rect = {}
        for rect in certifier.threat.rects:
            m = min_margins_reference(layers, frame, rect, certifier.patch_lo, certifier.patch_hi)
            per_rect[rect_key(rect)] = RectCert(*certificate_reference(m, int(label), certifier.options.tolerance))
        out.append(Certificate.from_rects(str(certifier.threat), per_rect))
    return out
