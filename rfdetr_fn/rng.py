"""Counter-based random numbers: every draw is a hash of (key, position), so randomness is an input.

A key is a 32-bit integer (a Python int or an int64 tensor) derived from whatever should make draws
differ: `mix(seed, step, rank)` for a train step, `mix(key, layer)` for one use inside it. The same key
gives the same numbers on any device, eagerly or under torch.compile (only integer tensor ops, no
generator state), so a function that takes its key as an argument stays pure. Like JAX's keys, but with
one small hash instead of threefry: plenty for drop path and point sampling.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
from torch import Tensor

IntLike = TypeVar("IntLike", int, Tensor)

MASK32 = 0xFFFFFFFF
_START = 0x9E3779B9  # the golden-ratio constant: mix() of nothing is not zero


def _mul32(x: IntLike, c: int) -> IntLike:
    """(x * c) mod 2**32 for 0 <= x < 2**32, in 16-bit halves so int64 tensors never overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def hash32(x: IntLike) -> IntLike:
    """A bijective 32-bit integer hash with full avalanche (Wellons' lowbias32), for ints and tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def mix(*parts: IntLike) -> IntLike:
    """One 32-bit key from non-negative integers, order-sensitive: `mix(seed, epoch, position)`.

    Parts above 32 bits are folded in (high half xor low half). A tensor part makes the result a tensor.
    """
    key: IntLike = _START
    for part in parts:
        key = hash32(key ^ ((part ^ (part >> 32)) & MASK32))
    return key


def uniform(key: IntLike, shape: tuple[int, ...], device: torch.device | str | None = None) -> Tensor:
    """float32 U[0, 1) of `shape` (24-bit resolution), element i = hash(key, i); on the key's device if it
    is a tensor."""
    if isinstance(key, Tensor):
        device = key.device
    counter = torch.arange(math.prod(shape), dtype=torch.int64, device=device)
    bits = hash32(hash32(counter) ^ key)
    return ((bits >> 8).to(torch.float32) * 2.0**-24).reshape(shape)


def key_tensor(key: int, device: torch.device | str | None = None) -> Tensor:
    """A key as the int64 0-dim tensor that train states carry."""
    return torch.tensor(key & MASK32, dtype=torch.int64, device=device)
