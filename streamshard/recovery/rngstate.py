"""Python, NumPy and torch CPU RNG states as JSON (saved per rank with each checkpoint)."""

from __future__ import annotations

import random

import numpy as np
import torch


def _numpy_state() -> list:
    name, keys, pos, has_gauss, gauss_value = np.random.get_state(legacy=True)
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss_value)]


def rng_state() -> dict:
    py = random.getstate()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss_value = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss_value))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
