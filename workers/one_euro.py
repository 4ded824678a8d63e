"""The One Euro filter (Casiez, Roussel, Vogel, CHI 2012), vectorised over channels.

Why this filter: animation curves need two contradictory things, no jitter when a channel
is still and no lag when it moves fast. The One Euro filter is a first-order low-pass
whose cutoff rises with the (filtered) speed of the signal:

    Te       = sampling period (s)
    alpha(f) = 1 / (1 + tau / Te),  tau = 1 / (2π f)
    dx_i     = (x_i - x̂_{i-1}) / Te,   dx̂_i = alpha(d_cutoff) dx_i + (1 - alpha(d_cutoff)) dx̂_{i-1}
    fc_i     = min_cutoff + beta |dx̂_i|
    x̂_i      = alpha(fc_i) x_i + (1 - alpha(fc_i)) x̂_{i-1}

With ``beta = 0`` it is a plain exponential low-pass at ``min_cutoff`` Hz. Every parameter
may be a scalar or a per-channel array; a channel with ``min_cutoff = inf`` passes through
unfiltered (used for blinks, which must stay crisp).
"""
from __future__ import annotations

import math

import numpy as np

ArrayLike = float | np.ndarray


def smoothing_factor(cutoff: ArrayLike, dt: float) -> np.ndarray:
    """alpha = 1 / (1 + tau/Te) with tau = 1/(2π fc); 1.0 for an infinite cutoff."""
    cutoff = np.asarray(cutoff, np.float64)
    with np.errstate(divide="ignore"):
        tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """Stateful One Euro filter over a vector of channels.

    ``filter(x, dt)`` takes one sample (a vector) ``dt`` seconds after the previous one;
    ``__call__(x, t)`` takes an absolute timestamp instead; ``filter_block`` runs a (n, c)
    block at a fixed rate. The first sample passes through unchanged (paper: x̂_1 = x_1).
    """

    def __init__(self, min_cutoff: ArrayLike = 1.0, beta: ArrayLike = 0.0,
                 d_cutoff: ArrayLike = 1.0) -> None:
        self.min_cutoff = np.asarray(min_cutoff, np.float64)
        self.beta = np.asarray(beta, np.float64)
        self.d_cutoff = np.asarray(d_cutoff, np.float64)
        self.reset()

    def reset(self) -> None:
        """Forget the past: the next sample passes through unchanged."""
        self.x_prev: np.ndarray | None = None
        self.dx_prev: np.ndarray | None = None
        self.t_prev: float | None = None

    def filter(self, x: ArrayLike, dt: float) -> np.ndarray:
        """Filter one sample taken ``dt`` seconds after the previous one."""
        x = np.asarray(x, np.float64)
        if self.x_prev is None:
            self.x_prev = x.copy()
            self.dx_prev = np.zeros_like(x)
            return x.copy()
        if not dt > 0:  # repeated timestamp: nothing new to learn, hold the estimate
            return self.x_prev.copy()
        a_d = smoothing_factor(self.d_cutoff, dt)
        dx = (x - self.x_prev) / dt
        dx_hat = a_d * dx + (1.0 - a_d) * self.dx_prev
        a = smoothing_factor(self.min_cutoff + self.beta * np.abs(dx_hat), dt)
        x_hat = a * x + (1.0 - a) * self.x_prev
        self.x_prev, self.dx_prev = x_hat, dx_hat
        return x_hat.copy()

    def __call__(self, x: ArrayLike, t: float) -> np.ndarray:
        """Filter one sample taken at absolute time ``t`` seconds."""
        dt = 0.0 if self.t_prev is None else t - self.t_prev
        self.t_prev = t
        return self.filter(x, dt)

    def filter_block(self, xs: np.ndarray, dt: float, min_cutoff: np.ndarray | None = None) -> np.ndarray:
        """Filter rows of ``xs`` (n, c) sampled every ``dt`` seconds, in order.

        ``min_cutoff`` (n, c), when given, replaces the filter's own minimum cutoff row by
        row (a cutoff that follows something other than the signal's speed).

        The recursion is sequential in time, so this loops over rows; the channels are
        vectorised and the per-rate constants computed once.
        """
        xs = np.asarray(xs, np.float64)
        out = np.empty_like(xs)
        if xs.shape[0] == 0:
            return out
        start = 0
        if self.x_prev is None:
            out[0] = self.filter(xs[0], dt)
            start = 1
        a_d = smoothing_factor(self.d_cutoff, dt)
        two_pi_dt = 2.0 * math.pi * dt
        x_prev, dx_prev = self.x_prev, self.dx_prev
        for i in range(start, xs.shape[0]):
            x = xs[i]
            mc = self.min_cutoff if min_cutoff is None else min_cutoff[i]
            dx_hat = a_d * ((x - x_prev) / dt) + (1.0 - a_d) * dx_prev
            # r = Te / tau; capped so an infinite cutoff gives alpha == 1.0, not inf/inf
            r = np.minimum(two_pi_dt * (mc + self.beta * np.abs(dx_hat)), 1e15)
            a = r / (r + 1.0)                                               # = 1/(1 + tau/Te)
            x_prev = a * x + (1.0 - a) * x_prev
            dx_prev = dx_hat
            out[i] = x_prev
        self.x_prev, self.dx_prev = x_prev, dx_prev
        if self.t_prev is not None:
            self.t_prev += dt * (xs.shape[0] - start)
        return out
