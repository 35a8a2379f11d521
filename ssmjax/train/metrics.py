"""Metrics as JSON lines and the console progress line."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file (empty if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per line, flushed per row. Rows have
    ``split`` (``"train"`` or ``"eval"``) and ``step`` (number of updates done).
    ``writes=False`` keeps the rows in memory only (the other processes of a multi-process
    job: one of them writes the shared file)."""

    def __init__(self, path: str | Path, writes: bool = True):
        self.path, self.writes = Path(path), writes
        self._rows = read_metrics(self.path)

    def truncate_after(self, step: int, keep_eval: bool = True) -> None:
        """Drop rows past ``step`` (written after the checkpoint a run resumes from), and
        the eval rows at ``step`` unless ``keep_eval``."""
        self._rows = [r for r in self._rows if r["step"] < step or (r["step"] == step and (keep_eval or r["split"] != "eval"))]
        if self.writes:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self._rows))

    def write(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if self.writes:
            with self.path.open("a") as f:
                f.write(json.dumps(row, allow_nan=False) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        return list(self._rows)

    def last_value(self, key: str, default: float) -> float:
        for row in reversed(self._rows):
            if key in row:
                return row[key]
        return default

    def summary(self) -> dict[str, float | None]:
        """Train loss/accuracy averaged over the last 10% of steps (at least 1, at most
        100 rows) and the mean logged throughput."""
        train = [r for r in self._rows if r["split"] == "train"]
        tail = train[-min(100, max(1, len(train) // 10)):]
        speeds = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        return dict(train_loss=mean([r["loss"] for r in tail]), train_accuracy=mean([r["accuracy"] for r in tail]),
                    tokens_per_s=mean(speeds))


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Prints ``step/steps loss acc tok/s eta`` every ``every`` steps (rewriting one line on
    a terminal, one line per report otherwise). ``update`` returns the throughput of the
    window it just reported (tokens per second), else ``None``."""

    def __init__(self, steps: int, every: int, title: str = "", enabled: bool = True, stream=None):
        self.steps, self.every, self.title, self.enabled = steps, max(1, every), title, enabled
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self._tokens, self._since = 0, time.perf_counter()
        self._first = True

    def update(self, step: int, loss: float, accuracy: float, tokens: int) -> float | None:
        self._tokens += tokens
        if step % self.every and step != self.steps:
            return None
        now = time.perf_counter()
        rate = self._tokens / max(now - self._since, 1e-9)
        steps_per_s = rate / max(tokens, 1)
        self._tokens, self._since = 0, now
        if self.enabled:
            compile_note = " (incl. compile)" if self._first else ""
            line = (f"{self.title} step {step}/{self.steps}  loss {loss:.4f}  acc {accuracy:.3f}  "
                    f"{rate / 1e3:.1f}k tok/s{compile_note}  eta {_duration((self.steps - step) / max(steps_per_s, 1e-9))}")
            self.stream.write(("\r" + line.ljust(100)) if self.tty else line + "\n")
            self.stream.flush()
        self._first = False
        return rate

    def eval(self, step: int, accuracy: float, loss: float | None = None) -> None:
        if self.enabled:
            loss_text = f", loss {loss:.4f}" if loss is not None else ""
            self.stream.write(("\n" if self.tty else "") + f"{self.title} eval @ {step}: accuracy {accuracy:.4f}"
                              f"{loss_text}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
