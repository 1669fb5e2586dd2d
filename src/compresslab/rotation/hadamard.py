"""Orthogonal transforms of a width n: Hadamard (fast, any order the Paley constructions and
Sylvester's doubling reach), randomised Hadamard (random signs first), and a random orthogonal matrix.

A Hadamard matrix H of order n has entries ±1 and H Hᵀ = n I; H/√n is orthogonal. Orders here are
n = K · 2^m with K a "base" order:
- Sylvester: H_2m = [[H_m, H_m], [H_m, −H_m]] (K = 1);
- Paley I (Paley 1933): q prime, q ≡ 3 (mod 4): order q + 1 (12 from q = 11, 20 from 19, 24, 32, 44, 48, 60, …);
- Paley II: q prime, q ≡ 1 (mod 4): order 2(q + 1) (12 from 5, 28 from 13, 36 from 17, 60, 76, …).
H_K ⊗ H_{2^m} is then applied as a fast transform, O(n (b + log n + K)) per vector instead of O(n²): the
innermost Sylvester factor H_b (b = min(2^m, 128)) as one GEMM with the ±1 matrix (on a CPU the butterfly
passes are memory-bound: 7 passes for 2^m = 128 took ~5x the GEMM's time), butterfly passes for the
rest of 2^m, and one (K × K) product. SmolLM2: 576 = 36 · 16,
1536 = 12 · 128, head 64 = 2^6. QuaRot (Ashkboos et al. 2024) and SpinQuant (Liu et al. 2024) use
the same Kronecker construction for widths that are not powers of two.
"""

from __future__ import annotations

import functools
import math

import torch

MAX_BASE = 256  # largest base order K searched (the dense K x K factor of the fast transform)
SYLVESTER_GEMM = 128  # the innermost power-of-two factor up to this order goes through one GEMM


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(math.isqrt(q)) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i) for the quadratic character χ modulo the prime q (χ(0) = 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley(k: int) -> torch.Tensor | None:
    """A Hadamard matrix of order k from Paley's constructions with a prime q, or None."""
    if _is_prime(k - 1) and (k - 1) % 4 == 3:  # Paley I: H = I + [[0, 1ᵀ], [−1, Q]]
        q = k - 1
        S = torch.zeros(k, k, dtype=torch.float64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, _jacobsthal(q)
        return torch.eye(k, dtype=torch.float64) + S
    if k % 2 == 0 and _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:  # Paley II
        q = k // 2 - 1
        C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, _jacobsthal(q)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(C, one) + torch.kron((C == 0).double(), zero)
    return None


@functools.lru_cache(maxsize=None)
def base_order(n: int) -> int | None:
    """The smallest K with n = K · 2^m and a Hadamard matrix of order K known here (1 for powers of
    two); None when there is none (then only a random orthogonal matrix is available)."""
    if n < 1:
        return None
    k = n
    while k % 2 == 0:
        k //= 2
    while k <= min(n, MAX_BASE):  # K = odd part · 2^j
        if k in (1, 2) or (k % 4 == 0 and _paley(k) is not None):
            return k
        k *= 2
    return None


@functools.lru_cache(maxsize=None)
def _base_matrix(k: int) -> torch.Tensor:
    if k in (1, 2):
        return torch.tensor([[1.0]], dtype=torch.float64) if k == 1 else \
            torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    H = _paley(k)
    assert H is not None and torch.equal(H @ H.T, k * torch.eye(k, dtype=torch.float64)), k
    return H


@functools.lru_cache(maxsize=None)
def _sylvester(b: int) -> torch.Tensor:
    """Sylvester's H_b (b a power of two), float64, built by doubling."""
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < b:
        H = torch.cat((torch.cat((H, H), 1), torch.cat((H, -H), 1)), 0)
    return H


def hadamard_transform(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """x @ H along the last dimension (n = K · 2^m), H = H_K ⊗ H_{2^m}, divided by √n when `normalize`
    (then orthogonal). Computed in x's dtype, without forming H."""
    n = x.shape[-1]
    k = base_order(n)
    if k is None:
        raise ValueError(f"no Hadamard matrix of order {n} is known here; use a random orthogonal matrix")
    s = n // k
    lead = x.shape[:-1]
    b = min(s, SYLVESTER_GEMM)  # x @ (I ⊗ H_b) on the last b entries: one GEMM
    y = (x.reshape(-1, b) @ _sylvester(b).to(x.dtype).to(x.device)).reshape(-1, k, s) if b > 1 else x.reshape(-1, k, s)
    h = b
    while h < s:  # Sylvester butterflies: y ← y H_{2h} on consecutive pairs of halves of length h
        y = y.reshape(-1, k, s // (2 * h), 2, h)
        a, c = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + c, a - c), dim=-2)
        h *= 2
    y = y.reshape(-1, k, s)
    if k > 1:  # x @ (A ⊗ B) = Aᵀ X B for X = x as (K, S)
        y = torch.matmul(_base_matrix(k).T.to(y.dtype).to(y.device), y)  # (K, K) @ (rows, K, S)
    y = y.reshape(*lead, n)
    return y / math.sqrt(n) if normalize else y


def hadamard_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """The normalised (orthogonal) H of `hadamard_transform` as a dense matrix."""
    return hadamard_transform(torch.eye(n, dtype=torch.float64)).to(dtype)


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs of R's diagonal folded into Q)."""
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))[None, :]


def random_hadamard(n: int, generator: torch.Generator) -> "Orthogonal":
    """diag(d) H/√n with random signs d (QuaRot's randomised Hadamard), or a random orthogonal matrix
    for widths with no known Hadamard matrix."""
    if base_order(n) is None:
        return Orthogonal(random_orthogonal(n, generator))
    return Orthogonal(signs=random_signs(n, generator), n=n)


class Orthogonal:
    """An orthogonal Q (n, n): dense, or diag(signs) H/√n applied as the fast transform (signs None:
    plain H/√n). `right(W)` = W Q over W's last dimension, float64 inside, W's dtype out."""

    def __init__(self, matrix: torch.Tensor | None = None, signs: torch.Tensor | None = None, n: int | None = None):
        self.dense, self.signs = matrix, signs
        self.n = matrix.shape[0] if matrix is not None else n

    def right(self, W: torch.Tensor) -> torch.Tensor:
        Wd = W.double()
        if self.dense is not None:
            return (Wd @ self.dense.to(W.device)).to(W.dtype)
        if self.signs is not None:
            Wd = Wd * self.signs.to(W.device)
        return hadamard_transform(Wd).to(W.dtype)

    def matrix(self) -> torch.Tensor:
        """Q as a dense float64 matrix."""
        return self.right(torch.eye(self.n, dtype=torch.float64))

    @property
    def shape(self):
        return (self.n, self.n)
