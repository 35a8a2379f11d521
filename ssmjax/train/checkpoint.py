"""Orbax checkpoints of the training state (``{params, opt_state, step}``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    """``save(step, state)`` / ``restore(like)`` / ``latest_step()`` over an orbax
    ``CheckpointManager`` that keeps the newest ``keep`` steps (synchronous saves: a
    checkpoint is complete on disk when ``save`` returns)."""

    def __init__(self, directory: str | Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep: expected >= 1 checkpoints to keep, got {keep}")
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()

    def restore(self, like: Any, step: int | None = None) -> Any:
        """The state saved at ``step`` (default: the newest), with the tree structure,
        shapes and dtypes of ``like``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"directory: no checkpoint in {self.directory}")
        return self._manager.restore(step, args=ocp.args.StandardRestore(like))

    def close(self) -> None:
        self._manager.close()
