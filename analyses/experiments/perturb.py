"""Ablations of the sub-network at step k: pure functions on weights and masks.

Every function takes weights as ``{name: array}`` (conv weights ``(out, in, kh, kw)``,
linear weights ``(out, in)``) and an IMP mask ``{name: bool array}`` of the same shapes,
and acts on the tensors named in the mask: those are the sub-network. It returns new
arrays for exactly those names, float32, with every masked (pruned) entry exactly zero;
the caller keeps every other parameter and buffer (biases, BatchNorm) at step k.

Structures, for `permute`:

- ``layer``: all unpruned weights of a tensor;
- ``filter``: the slice of one output unit, ``w[o]`` (``(in, kh, kw)`` for a conv,
  ``(in,)`` for a linear layer);
- ``kernel``: the spatial slice of one (output, input) pair, ``w[o, i]`` (``(kh, kw)``).
  A linear layer is a 1x1 convolution, so its kernels are single weights and permuting
  within them leaves it unchanged (as it does a 1x1 convolution, e.g. a ResNet shortcut).

The initialisation distribution is the one `ckpt_tools.models.build` draws from: kaiming
normal, fan in, ReLU gain, ``std = sqrt(2 / fan_in)`` with ``fan_in = in * kh * kw``.

`ABLATIONS` maps each name that ``ckpt ablate --kind`` accepts to a function
``(Start, *, seed, alpha) -> Ablated``; a new ablation is one function and one line there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "ABLATIONS",
    "Ablated",
    "Start",
    "add_noise",
    "add_noise_norm_matched",
    "gaussian_reinit",
    "init_std",
    "permute",
    "random_mask",
    "random_reinit",
    "recombine",
    "signs_with_init_magnitudes",
]

Weights = Mapping[str, np.ndarray]
Mask = Mapping[str, np.ndarray]
Within = Literal["layer", "filter", "kernel"]


def init_std(shape: tuple[int, ...]) -> float:
    """Standard deviation of the model's initialisation for a weight of `shape`.

    Args:
        shape: ``(out, in, *kernel)`` of a conv or linear weight.

    Returns:
        ``sqrt(2 / fan_in)`` with ``fan_in = in * prod(kernel)`` (kaiming normal, fan in).
    """
    if len(shape) < 2:
        raise ValueError(f"initialisation std needs an (out, in, ...) weight, got shape {shape}")
    return math.sqrt(2.0 / (shape[1] * math.prod(shape[2:])))


def _rng(seed: int, name: str) -> np.random.Generator:
    # One independent stream per (seed, tensor), whatever the order of the tensors.
    return np.random.default_rng([seed, *name.encode()])


def _check(weights: Weights, mask: Mask) -> None:
    for name, m in mask.items():
        if name not in weights:
            raise KeyError(f"mask names {name!r}, which the weights do not hold")
        if np.shape(weights[name]) != np.shape(m):
            raise ValueError(
                f"{name}: weight shape {np.shape(weights[name])} != mask shape {np.shape(m)}"
            )


def _masked(values: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.where(np.asarray(m, dtype=bool), values, 0.0).astype(np.float32)


def recombine(signs_from: Weights, magnitudes_from: Weights, mask: Mask) -> dict[str, np.ndarray]:
    """Signs of one set of weights times the magnitudes of another, on the mask.

    Returns:
        ``sign(signs_from) * |magnitudes_from|`` on unpruned entries, 0 elsewhere.
    """
    _check(signs_from, mask)
    _check(magnitudes_from, mask)
    return {
        n: _masked(np.sign(signs_from[n]) * np.abs(magnitudes_from[n]), m) for n, m in mask.items()
    }


def signs_with_init_magnitudes(
    signs_from: Weights, mask: Mask, *, seed: int = 0
) -> dict[str, np.ndarray]:
    """Signs of `signs_from` with magnitudes drawn afresh: ``|N(0, init_std(shape))|``."""
    _check(signs_from, mask)
    out = {}
    for n, m in mask.items():
        w = np.asarray(signs_from[n])
        draw = _rng(seed, n).normal(0.0, init_std(w.shape), size=w.shape)
        out[n] = _masked(np.sign(w) * np.abs(draw), m)
    return out


def _groups(shape: tuple[int, ...], within: Within) -> tuple[int, int]:
    if within == "layer":
        return 1, math.prod(shape)
    if within == "filter":
        return shape[0], math.prod(shape[1:])
    if within == "kernel":
        return math.prod(shape[:2]), math.prod(shape[2:])
    raise ValueError(f"within must be 'layer', 'filter' or 'kernel', got {within!r}")


def _permute_rows(values: np.ndarray, keep: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # values, keep: (G, S). Within each row, send the kept values to the kept positions in
    # a uniformly random order. Sorting by ~keep lists the kept positions first (in place
    # order); sorting by random keys with the pruned ones at +inf lists them first in a
    # random order; both lists start with the row's count of kept entries.
    targets = np.argsort(~keep, axis=1, kind="stable")
    keys = np.where(keep, rng.random(keep.shape), np.inf)
    sources = np.argsort(keys, axis=1, kind="stable")
    out = np.empty_like(values)
    np.put_along_axis(out, targets, np.take_along_axis(values, sources, axis=1), axis=1)
    return np.where(keep, out, 0.0)


def permute(
    weights: Weights,
    mask: Mask,
    *,
    within: Within = "layer",
    keep_signs: bool = False,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Shuffle the unpruned weights among the unpruned positions of each structure.

    Args:
        weights: Weights at step k.
        mask: The sub-network; pruned positions stay pruned and zero.
        within: ``"layer"``, ``"filter"`` or ``"kernel"`` (see the module docstring).
        keep_signs: Shuffle only the magnitudes; every position keeps its own sign.
        seed: Seed of the permutations.

    Returns:
        For each masked tensor, a uniformly random permutation of its unpruned values
        within each structure (with `keep_signs`, of their magnitudes, times the sign of
        the weight that was at each position).
    """
    _check(weights, mask)
    out = {}
    for n, m in mask.items():
        w = np.asarray(weights[n], dtype=np.float32)
        g, s = _groups(w.shape, within)
        keep = np.asarray(m, dtype=bool).reshape(g, s)
        values = np.abs(w) if keep_signs else w
        shuffled = _permute_rows(values.reshape(g, s), keep, _rng(seed, n)).reshape(w.shape)
        out[n] = _masked(np.sign(w) * shuffled if keep_signs else shuffled, m)
    return out


def _layer_moments(w: np.ndarray, m: np.ndarray) -> tuple[float, float]:
    kept = np.asarray(w, dtype=np.float64)[np.asarray(m, dtype=bool)]
    if kept.size == 0:
        return 0.0, 0.0
    return float(kept.mean()), float(kept.std())


def gaussian_reinit(
    weights: Weights, mask: Mask, *, keep_signs: bool = False, seed: int = 0
) -> dict[str, np.ndarray]:
    """Redraw each layer from a Gaussian with its mean and std at step k.

    Mean and (population) standard deviation are over the layer's unpruned weights.

    Returns:
        ``x ~ N(mean, std)`` per unpruned entry; with `keep_signs`, ``sign(w) * |x|`` for
        the same draw ``x`` (so the two variants differ only in the signs).
    """
    _check(weights, mask)
    out = {}
    for n, m in mask.items():
        w = np.asarray(weights[n])
        mean, std = _layer_moments(w, m)
        draw = _rng(seed, n).normal(mean, std, size=w.shape)
        out[n] = _masked(np.sign(w) * np.abs(draw) if keep_signs else draw, m)
    return out


def add_noise(
    weights: Weights, mask: Mask, *, alpha: float, seed: int = 0
) -> dict[str, np.ndarray]:
    """Add Gaussian noise of `alpha` times each layer's std (over unpruned weights at k).

    Returns:
        ``w + alpha * std * N(0, 1)`` on unpruned entries.
    """
    return {n: _masked(noisy, mask[n]) for n, noisy in _noisy(weights, mask, alpha, seed).items()}


def add_noise_norm_matched(
    weights: Weights, mask: Mask, *, alpha: float, seed: int = 0
) -> dict[str, np.ndarray]:
    """`add_noise`, then each layer scaled back to the L2 norm its unpruned weights had at k.

    Conv layers followed by BatchNorm compute the same function at any scale of their
    weights, but a larger norm lowers their effective learning rate; plain noise grows a
    layer's norm by about ``sqrt(1 + alpha**2)``, a permutation keeps it. This control
    keeps the norm, so only the direction moves.

    Returns:
        ``v * ||m * w|| / ||v||`` per layer, with ``v = m * (w + alpha * std * N(0, 1))``
        the same draw as `add_noise` with the same seed (so the direction is that of
        `add_noise`'s result); a layer whose ``v`` is all zero stays zero.
    """
    out = {}
    for n, noisy in _noisy(weights, mask, alpha, seed).items():
        m = np.asarray(mask[n], dtype=bool)
        v = np.where(m, noisy, 0.0)
        target = np.linalg.norm(np.where(m, np.asarray(weights[n], dtype=np.float64), 0.0))
        norm = np.linalg.norm(v)
        out[n] = _masked(v * (target / norm) if norm > 0 else v, m)
    return out


def _noisy(weights: Weights, mask: Mask, alpha: float, seed: int) -> dict[str, np.ndarray]:
    """``w + alpha * std * N(0, 1)`` per masked tensor, float64, before masking."""
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"noise scale alpha must be finite and >= 0, got {alpha}")
    _check(weights, mask)
    out = {}
    for n, m in mask.items():
        w = np.asarray(weights[n], dtype=np.float64)
        _, std = _layer_moments(w, m)
        out[n] = w + alpha * std * _rng(seed, n).standard_normal(w.shape)
    return out


def random_reinit(mask: Mask, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh weights from the initialisation distribution, ``N(0, init_std(shape))``, masked."""
    return {
        n: _masked(_rng(seed, n).normal(0.0, init_std(np.shape(m)), size=np.shape(m)), m)
        for n, m in mask.items()
    }


def random_mask(mask: Mask, *, seed: int = 0) -> dict[str, np.ndarray]:
    """A uniformly random mask with the same number of unpruned weights in every tensor."""
    out = {}
    for n, m in mask.items():
        m = np.asarray(m, dtype=bool)
        flat = np.zeros(m.size, dtype=bool)
        flat[_rng(seed, n).permutation(m.size)[: int(m.sum())]] = True
        out[n] = flat.reshape(m.shape)
    return out


@dataclass(frozen=True)
class Start:
    """What an ablation starts from.

    Attributes:
        w0: Weights at step 0, ``{name: array}``.
        wk: Weights at the rewind step k.
        mask: The IMP sub-network, ``{name: bool array}``; names the tensors ablated.
    """

    w0: Mapping[str, np.ndarray]
    wk: Mapping[str, np.ndarray]
    mask: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Ablated:
    """The starting point of an ablated run: new weights for the masked tensors, and the mask."""

    weights: dict[str, np.ndarray]
    mask: dict[str, np.ndarray]


Ablation = Callable[..., Ablated]


def _same_mask(fn: Callable[[Start, int, float], dict[str, np.ndarray]]) -> Ablation:
    def ablation(start: Start, *, seed: int = 0, alpha: float = 1.0) -> Ablated:
        mask = {n: np.asarray(m, dtype=bool) for n, m in start.mask.items()}
        return Ablated(fn(start, seed, alpha), mask)

    return ablation


def _random_mask(start: Start, *, seed: int = 0, alpha: float = 1.0) -> Ablated:
    mask = random_mask(start.mask, seed=seed)
    return Ablated({n: _masked(np.asarray(start.wk[n]), m) for n, m in mask.items()}, mask)


def _permutation(within: Within, keep_signs: bool) -> Ablation:
    return _same_mask(
        lambda s, seed, a: permute(s.wk, s.mask, within=within, keep_signs=keep_signs, seed=seed)
    )


ABLATIONS: dict[str, Ablation] = {
    "signs_k_mags_k": _same_mask(lambda s, seed, a: recombine(s.wk, s.wk, s.mask)),
    "signs_k_mags_0": _same_mask(lambda s, seed, a: recombine(s.wk, s.w0, s.mask)),
    "signs_0_mags_k": _same_mask(lambda s, seed, a: recombine(s.w0, s.wk, s.mask)),
    "signs_0_mags_0": _same_mask(lambda s, seed, a: recombine(s.w0, s.w0, s.mask)),
    "signs_k_mags_init": _same_mask(
        lambda s, seed, a: signs_with_init_magnitudes(s.wk, s.mask, seed=seed)
    ),
    "permute_layer": _permutation("layer", False),
    "permute_layer_signs": _permutation("layer", True),
    "permute_filter": _permutation("filter", False),
    "permute_filter_signs": _permutation("filter", True),
    "permute_kernel": _permutation("kernel", False),
    "permute_kernel_signs": _permutation("kernel", True),
    "gaussian": _same_mask(lambda s, seed, a: gaussian_reinit(s.wk, s.mask, seed=seed)),
    "gaussian_signs": _same_mask(
        lambda s, seed, a: gaussian_reinit(s.wk, s.mask, keep_signs=True, seed=seed)
    ),
    "noise": _same_mask(lambda s, seed, a: add_noise(s.wk, s.mask, alpha=a, seed=seed)),
    "noise_norm_matched": _same_mask(
        lambda s, seed, a: add_noise_norm_matched(s.wk, s.mask, alpha=a, seed=seed)
    ),
    "random_reinit": _same_mask(lambda s, seed, a: random_reinit(s.mask, seed=seed)),
    "random_mask": _random_mask,
}
"""Ablation name -> ``fn(start, *, seed, alpha) -> Ablated``. ``signs_k_mags_k`` is plain
rewinding to step k, ``signs_0_mags_0`` rewinding to step 0; `alpha` is used by ``noise``
and ``noise_norm_matched`` only; ``random_mask`` keeps the weights at step k under a random
mask of equal per-tensor sparsity."""
