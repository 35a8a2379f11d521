"""Chaotic dynamical systems for forecasting benchmarks, simulated in JAX.

The systems and settings of "Deconstructing Recurrence, Attention, and Gating" (Heidenreich,
Vlachas, Koumoutsakos et al., 2024), which follows Vlachas et al. (2018, 2020):

* **Lorenz-96** (Lorenz 1996, "Predictability: a problem partly solved"), ``J = 40``
  variables on a ring, forcing ``F = 8``, classical RK4 with ``dt = 0.01``:

      dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F,       i = 0..J-1 (indices mod J)

  Largest Lyapunov exponent about 1.68 (Vlachas et al. 2020, Pathak et al. 2018).
* **Two-scale Lorenz-96** (Lorenz 1996; parameters of Thornes, Duben & Palmer 2017,
  "On the use of scale-dependent precision in Earth system modelling"): ``K = 8`` slow
  ``X_k``, ``J = 32`` fast ``Y_{j,k}`` per slow variable, ``F = 20``, ``h = 1``, ``b = c = 10``:

      dX_k/dt     = X_{k-1} (X_{k+1} - X_{k-2}) - X_k + F - (h c / b) sum_j Y_{j,k}
      dY_{j,k}/dt = -c b Y_{j+1,k} (Y_{j+2,k} - Y_{j-1,k}) - c Y_{j,k} + (h c / b) X_k

  The fast variables form one ring of ``K J`` values (``Y_{J,k} = Y_{0,k+1}``). RK4 with
  ``dt = 0.001`` internally (the fast scale needs it: 0.005 leaves errors of 4e-3 in ``Y``
  after 0.05 time units, 0.001 leaves 1e-5), sampled every ``0.01``. The state is ``[X (K), Y (K*J)]``.
* **Kuramoto-Sivashinsky** ``u_t = -u u_x - u_xx - u_xxxx`` on the periodic domain
  ``[0, L)``, ``L = 22``, ``N = 64`` grid points / Fourier modes, ETDRK4 with ``dt = 0.25``
  (Cox & Matthews 2002; coefficients by the contour integral of Kassam & Trefethen 2005,
  "Fourth-order time-stepping for stiff PDEs", ``M = 16`` points). In Fourier space
  ``v_k' = (q_k^2 - q_k^4) v_k - (i q_k / 2) FFT(u^2)_k`` with ``q_k = 2 pi k / L``; the
  derivative of the Nyquist mode is 0 (as in Kassam & Trefethen's ``kursiv.m``) while its
  linear rate keeps ``q^2 - q^4`` (about -6900), so it is damped to 0 in one step. Largest Lyapunov
  exponent 0.043-0.048 (Edson et al. 2019; Vlachas et al. 2020 use 0.043); ours, float64
  Benettin over 5e4-1e5 time units: 0.0476-0.0483 for the flow (ETDRK4 at dt = 0.125 and
  0.0625), 0.0487-0.0495 for the dt = 0.25 sampling map (its time-stepping error adds ~3%).

Every step is a pure function ``x -> x_next`` of a state vector ``[d]`` (``vmap`` for a
batch). They work in the input's dtype: float32 to generate training data quickly, float64
for the tests and the Lyapunov estimates. :func:`lyapunov_exponent` is the Benettin
algorithm with the tangent vector propagated by ``jax.jvp`` of the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jaxtyping import Float

from ssmjax.checks import check_choice, check_positive_int

SYSTEMS = ("lorenz96", "lorenz96_2scale", "ks")


# ----------------------------------------------------------------------------- Lorenz-96

def lorenz96_tendency(x: Float[Array, "*b j"], forcing: float = 8.0) -> Float[Array, "*b j"]:
    """``dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F`` on a ring (Lorenz 1996)."""
    return (jnp.roll(x, -1, -1) - jnp.roll(x, 2, -1)) * jnp.roll(x, 1, -1) - x + forcing


def lorenz96_2scale_tendency(state: Float[Array, "*b n"], k: int = 8, j: int = 32, forcing: float = 20.0,
                             h: float = 1.0, b: float = 10.0, c: float = 10.0) -> Float[Array, "*b n"]:
    """Two-scale Lorenz-96 (module docstring); ``state = [X (k), Y (k*j)]``, ``Y`` ordered
    ``Y_{0,0}, Y_{1,0}, ..., Y_{j-1,0}, Y_{0,1}, ...`` (one ring of ``k j`` values)."""
    x, y = state[..., :k], state[..., k:]
    coupling = h * c / b
    y_sum = y.reshape(y.shape[:-1] + (k, j)).sum(-1)
    dx = jnp.roll(x, 1, -1) * (jnp.roll(x, -1, -1) - jnp.roll(x, 2, -1)) - x + forcing - coupling * y_sum
    x_rep = jnp.repeat(x, j, axis=-1)
    dy = -c * b * jnp.roll(y, -1, -1) * (jnp.roll(y, -2, -1) - jnp.roll(y, 1, -1)) - c * y + coupling * x_rep
    return jnp.concatenate([dx, dy], -1)


def rk4_step(tendency: Callable[[Array], Array], x: Array, dt: float) -> Array:
    """One classical Runge-Kutta step of ``dx/dt = f(x)``:
    ``x + dt/6 (k1 + 2 k2 + 2 k3 + k4)``, ``k1 = f(x)``, ``k2 = f(x + dt/2 k1)``,
    ``k3 = f(x + dt/2 k2)``, ``k4 = f(x + dt k3)``."""
    k1 = tendency(x)
    k2 = tendency(x + 0.5 * dt * k1)
    k3 = tendency(x + 0.5 * dt * k2)
    k4 = tendency(x + dt * k3)
    return x + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


# ----------------------------------------------------------------------------- Kuramoto-Sivashinsky

class KSCoefficients(NamedTuple):
    """ETDRK4 coefficients of Kassam & Trefethen (2005) for the KS equation (``rfft`` modes)."""

    e: Array        # exp(dt L)
    e2: Array       # exp(dt L / 2)
    q: Array        # dt * mean_r (exp(z/2) - 1) / z,       z = dt L + r
    f1: Array       # dt * mean_r (-4 - z + e^z (4 - 3 z + z^2)) / z^3
    f2: Array       # dt * mean_r (2 + z + e^z (-2 + z)) / z^3
    f3: Array       # dt * mean_r (-4 - 3 z - z^2 + e^z (4 - z)) / z^3
    g: Array        # -i q_k / 2  (the nonlinear term's multiplier)


def ks_wavenumbers(length: float, n: int) -> np.ndarray:
    """``q_k = 2 pi k / L`` for the ``rfft`` modes ``k = 0..n/2``."""
    return 2.0 * np.pi * np.arange(n // 2 + 1) / length


def ks_coefficients(length: float = 22.0, n: int = 64, dt: float = 0.25, dtype=jnp.float32,
                    contour_points: int = 16) -> KSCoefficients:
    """ETDRK4 coefficients for ``L = q^2 - q^4`` (computed in float64 numpy, cast to ``dtype``'s
    complex type). The ``phi`` functions are averaged over ``contour_points`` points
    ``z + exp(i pi (m - 1/2) / M)`` on the upper half of a unit circle around each
    ``z = dt L_k``; their real part is the exact value (Kassam & Trefethen 2005, eq. 2.5 and
    ``kursiv.m``), free of the cancellation of the direct formulas for small ``|z|``."""
    check_positive_int("n", n)
    check_positive_int("contour_points", contour_points)
    q = ks_wavenumbers(length, n)
    lin = q ** 2 - q ** 4
    roots = np.exp(1j * np.pi * (np.arange(1, contour_points + 1) - 0.5) / contour_points)
    z = dt * lin[:, None] + roots[None, :]
    mean = lambda a: np.real(a.mean(-1))  # noqa: E731
    coeffs = dict(
        e=np.exp(dt * lin), e2=np.exp(dt * lin / 2),
        q=dt * mean((np.exp(z / 2) - 1) / z),
        f1=dt * mean((-4 - z + np.exp(z) * (4 - 3 * z + z ** 2)) / z ** 3),
        f2=dt * mean((2 + z + np.exp(z) * (-2 + z)) / z ** 3),
        f3=dt * mean((-4 - 3 * z - z ** 2 + np.exp(z) * (4 - z)) / z ** 3),
        g=-0.5j * np.where(np.arange(q.size) == n // 2, 0.0, q) if n % 2 == 0 else -0.5j * q,
    )
    real = jnp.dtype(dtype)
    cplx = jnp.complex128 if real == jnp.float64 else jnp.complex64
    return KSCoefficients(**{k: jnp.asarray(v, cplx if k == "g" else real) for k, v in coeffs.items()})


def ks_step(u: Float[Array, "*b n"], coeffs: KSCoefficients) -> Float[Array, "*b n"]:
    """One ETDRK4 step (Cox & Matthews 2002, in the form of Kassam & Trefethen 2005) of the
    KS equation for the grid values ``u`` (``N(v) = g FFT(IFFT(v)^2)``):

        a = E2 v + Q N(v),  b = E2 v + Q N(a),  c = E2 a + Q (2 N(b) - N(v))
        v+ = E v + f1 N(v) + 2 f2 (N(a) + N(b)) + f3 N(c)
    """
    n = u.shape[-1]
    nonlinear = lambda v: coeffs.g * jnp.fft.rfft(jnp.fft.irfft(v, n) ** 2)  # noqa: E731
    v = jnp.fft.rfft(u)
    nv = nonlinear(v)
    a = coeffs.e2 * v + coeffs.q * nv
    na = nonlinear(a)
    b = coeffs.e2 * v + coeffs.q * na
    nb = nonlinear(b)
    c = coeffs.e2 * a + coeffs.q * (2 * nb - nv)
    nc = nonlinear(c)
    v = coeffs.e * v + nv * coeffs.f1 + 2 * (na + nb) * coeffs.f2 + nc * coeffs.f3
    return jnp.fft.irfft(v, n).astype(u.dtype)


# ----------------------------------------------------------------------------- systems

@dataclasses.dataclass(frozen=True)
class System:
    """A dynamical system sampled every ``dt`` time units.

    ``step(x) -> x_next`` advances one sample (``substeps`` integrator steps of ``dt /
    substeps``); ``lyapunov`` is the literature value of the largest Lyapunov exponent
    (per time unit), used to express times in Lyapunov times ``t * lyapunov``;
    ``ic_scale`` the size of the random initial conditions; ``reference`` the citation.
    """

    name: str
    dim: int
    dt: float
    step: Callable[[Array], Array]
    lyapunov: float
    ic_offset: float
    ic_scale: float
    reference: str
    spatial: bool = True  # the state is a field on a periodic 1-D grid (spectrum over it)


def make_system(name: str, dtype=jnp.float32) -> System:
    """The system ``name`` (one of :data:`SYSTEMS`) at the paper's settings (module docstring)."""
    check_choice("system", name, SYSTEMS)
    if name == "lorenz96":
        dt = 0.01
        step = partial(rk4_step, partial(lorenz96_tendency, forcing=8.0), dt=dt)
        return System(name, 40, dt, step, 1.68, 8.0, 1.0,
                      "Lorenz (1996); J = 40, F = 8, RK4 dt = 0.01; lambda_1 ~ 1.68 (Vlachas et al. 2020)")
    if name == "lorenz96_2scale":
        dt, substeps = 0.01, 10
        tend = partial(lorenz96_2scale_tendency, k=8, j=32, forcing=20.0, h=1.0, b=10.0, c=10.0)

        def step(x):
            for _ in range(substeps):
                x = rk4_step(tend, x, dt / substeps)
            return x

        # lambda_1 of this system is dominated by the fast scale; 19.3 is our own Benettin
        # estimate (float64, RK4 dt = 0.001, two initial conditions, 200 time units: 19.25
        # and 19.44), not a literature value.
        return System(name, 8 + 8 * 32, dt, step, 19.3, 0.0, 1.0,
                      "Lorenz (1996); K = 8, J = 32, F = 20, h = 1, b = c = 10 (Thornes et al. 2017); "
                      "RK4 dt = 0.001, sampled every 0.01", spatial=False)
    coeffs = ks_coefficients(22.0, 64, 0.25, dtype)
    return System(name, 64, 0.25, partial(ks_step, coeffs=coeffs), 0.043, 0.0, 0.5,
                  "Kuramoto-Sivashinsky L = 22, N = 64, ETDRK4 dt = 0.25 (Kassam & Trefethen 2005); "
                  "lambda_1 ~ 0.043 (Vlachas et al. 2020)")


def initial_conditions(system: System, key: Array, count: int, dtype=jnp.float32) -> Float[Array, "n d"]:
    """``count`` random states ``ic_offset + ic_scale * N(0, 1)`` (KS: the mean is removed,
    since mode 0 is conserved and the attractor has zero mean)."""
    x = system.ic_offset + system.ic_scale * jax.random.normal(key, (count, system.dim), dtype)
    if system.name == "ks":
        x = x - x.mean(-1, keepdims=True)
    return x


def simulate(step: Callable[[Array], Array], x0: Float[Array, "*b d"], n_steps: int) -> Float[Array, "*b t d"]:
    """``[step(x0), step^2(x0), ..., step^n(x0)]`` along a new time axis before the last."""
    def body(x, _):
        x = step(x)
        return x, x

    _, xs = jax.lax.scan(body, x0, None, length=n_steps)
    return jnp.moveaxis(xs, 0, -2)


@partial(jax.jit, static_argnames=("system", "count", "n_steps", "transient", "dtype"))
def trajectories(system: System, key: Array, count: int, n_steps: int, transient: int,
                 dtype=jnp.float32) -> Float[Array, "n t d"]:
    """``count`` trajectories of ``n_steps`` samples from independent random initial
    conditions (``key``), after discarding ``transient`` samples so they lie on the attractor."""
    x0 = initial_conditions(system, key, count, dtype)
    step = jax.vmap(system.step)
    if transient:
        x0 = jax.lax.fori_loop(0, transient, lambda _, x: step(x), x0)
    return simulate(step, x0, n_steps)


def attractor_std(data: Float[Array, "*b t d"]) -> Float[Array, "d"]:
    """Per-dimension standard deviation over all leading axes (the NRMSE normaliser)."""
    return jnp.std(data.reshape(-1, data.shape[-1]), axis=0)


@partial(jax.jit, static_argnames=("step", "n_blocks", "renorm_every", "dt"))
def lyapunov_exponent(step: Callable[[Array], Array], x0: Float[Array, "d"], key: Array, *, dt: float,
                      n_blocks: int, renorm_every: int = 10) -> Array:
    """Largest Lyapunov exponent by Benettin et al. (1980): propagate a tangent vector ``v``
    with the linearised step (``jax.jvp``), renormalise it every ``renorm_every`` steps and
    average the logarithmic growth:

        lambda_1 = 1 / (n_blocks * renorm_every * dt) * sum_blocks log ||v_block||

    ``x0`` should already be on the attractor (discard a transient first). Use float64.
    """
    v0 = jax.random.normal(key, x0.shape, x0.dtype)
    v0 = v0 / jnp.linalg.norm(v0)

    def block(carry, _):
        x, v = carry

        def inner(c, _):
            return jax.jvp(step, (c[0],), (c[1],)), None

        (x, v), _ = jax.lax.scan(inner, (x, v), None, length=renorm_every)
        norm = jnp.linalg.norm(v)
        return (x, v / norm), jnp.log(norm)

    _, logs = jax.lax.scan(block, (x0, v0), None, length=n_blocks)
    return logs.sum() / (n_blocks * renorm_every * dt)


def lyapunov_time_steps(system: System, lyapunov: float | None = None) -> float:
    """Samples per Lyapunov time ``1 / (lambda_1 dt)``."""
    lam = system.lyapunov if lyapunov is None else lyapunov
    if lam <= 0:
        raise ValueError(f"lyapunov: expected a positive exponent for {system.name}, got {lam}")
    return 1.0 / (lam * system.dt)


__all__ = ["SYSTEMS", "KSCoefficients", "System", "attractor_std", "initial_conditions", "ks_coefficients",
           "ks_step", "ks_wavenumbers", "lorenz96_2scale_tendency", "lorenz96_tendency", "lyapunov_exponent",
           "lyapunov_time_steps", "make_system", "rk4_step", "simulate", "trajectories"]
