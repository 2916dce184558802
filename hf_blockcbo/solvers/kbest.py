"""A fixed-size archive of the K lowest-energy distinct states, usable from numba-compiled code.

The archive is a max-heap on energy (root = current K-th energy, the admission threshold) with each entry's state
(M sorted indices) and its Zobrist hash for duplicate detection.
"""

from __future__ import annotations

import numpy as np
from numba import njit


def new_archive(top_k: int, num_remove: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(energies, states, hashes, size) arrays for :func:`archive_insert`."""
    return (
        np.full(top_k, np.inf),
        np.zeros((top_k, num_remove), dtype=np.int64),
        np.zeros(top_k, dtype=np.uint64),
        np.zeros(1, dtype=np.int64),
    )


@njit(cache=True)
def archive_threshold(energies: np.ndarray, size: np.ndarray) -> float:
    return energies[0] if size[0] == energies.shape[0] else np.inf


@njit(cache=True)
def _sift_down(energies, states, hashes, start, size):
    pos = start
    while True:
        left = 2 * pos + 1
        if left >= size:
            return
        child = left
        right = left + 1
        if right < size and energies[right] > energies[left]:
            child = right
        if energies[child] <= energies[pos]:
            return
        energies[pos], energies[child] = energies[child], energies[pos]
        hashes[pos], hashes[child] = hashes[child], hashes[pos]
        for t in range(states.shape[1]):
            states[pos, t], states[child, t] = states[child, t], states[pos, t]
        pos = child


@njit(cache=True)
def _sift_up(energies, states, hashes, pos):
    while pos > 0:
        parent = (pos - 1) // 2
        if energies[parent] >= energies[pos]:
            return
        energies[pos], energies[parent] = energies[parent], energies[pos]
        hashes[pos], hashes[parent] = hashes[parent], hashes[pos]
        for t in range(states.shape[1]):
            states[pos, t], states[parent, t] = states[parent, t], states[pos, t]
        pos = parent


@njit(cache=True)
def _contains(states, hashes, size, state_hash, state):
    for k in range(size):
        if hashes[k] == state_hash:
            same = True
            for t in range(state.shape[0]):
                if states[k, t] != state[t]:
                    same = False
                    break
            if same:
                return True
    return False


@njit(cache=True)
def archive_insert(energies, states, hashes, size, energy, state, state_hash, check_duplicates):
    """Insert a sorted ``state`` if it beats the K-th energy (and, if asked, is not already held). True if inserted."""
    n = size[0]
    capacity = energies.shape[0]
    if n == capacity and energy >= energies[0]:
        return False
    if check_duplicates and _contains(states, hashes, n, state_hash, state):
        return False
    if n < capacity:
        energies[n] = energy
        hashes[n] = state_hash
        states[n, :] = state
        size[0] = n + 1
        _sift_up(energies, states, hashes, n)
    else:
        energies[0] = energy
        hashes[0] = state_hash
        states[0, :] = state
        _sift_down(energies, states, hashes, 0, n)
    return True


def archive_contents(energies, states, size) -> tuple[np.ndarray, np.ndarray]:
    n = int(size[0])
    return states[:n].copy(), energies[:n].copy()
