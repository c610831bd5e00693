"""Who am I in the job: the only module that reads ``torch.distributed`` or the environment.

Everything else takes a :class:`World` value. No collective calls and no barriers here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from streamshard.errors import ConfigError


@dataclass(frozen=True)
class World:
    """Position of this process in the job. A plain value: picklable, hashable, stable repr."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ConfigError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if self.local_world_size < 1:
            raise ConfigError(f"local_world_size must be >= 1, got {self.local_world_size}")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ConfigError(
                f"local_rank must be in [0, {self.local_world_size}), got {self.local_rank}"
            )

    @property
    def node(self) -> int:
        """Index of this process's node, assuming ranks are laid out node by node."""
        return self.rank // self.local_world_size

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // self.local_world_size)


def _env_int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {raw!r}") from None


def detect_world(env: dict[str, str] | None = None) -> World:
    """Return the World from an initialized ``torch.distributed`` group, else from the
    standard launcher variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), else a
    single-process world. Makes no collective calls."""
    env = dict(os.environ) if env is None else env
    rank = _env_int(env, "RANK", 0)
    world_size = _env_int(env, "WORLD_SIZE", 1)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
    except ImportError:  # torch is a dependency, but World must not need it
        pass
    local_world_size = _env_int(env, "LOCAL_WORLD_SIZE", world_size if "LOCAL_RANK" not in env else 1)
    local_rank = _env_int(env, "LOCAL_RANK", rank % max(local_world_size, 1))
    if local_world_size < 1 or local_rank >= local_world_size:
        local_world_size, local_rank = world_size, rank
    return World(rank, world_size, local_rank, local_world_size)
