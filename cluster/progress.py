"""Progress for a person at a terminal, or for a night's log: images done of all (skipped ones included), the rate
of new ones, the ETA; and tile-steps.

On a terminal: two tqdm bars. Elsewhere (cron, `ray job submit`, a log file): one plain line every `interval`
seconds and at the end, e.g. ``tessera: 412/1000 images (300 already done, 2 failed), 3.1 images/min, ETA 0:03:48``.
The tile-steps total grows as work is handed out (a streamed plan's is not known up front).
"""
from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Optional

from tqdm.auto import tqdm


def _eta(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


class Progress:
    def __init__(self, images: int, tile_steps: Optional[int] = None, enabled: bool = True,
                 total_known: bool = True, label: str = "images", interval: float = 30.0, stream=None):
        self.total, self.total_known, self.label = images, total_known, label
        self.done = self.new = self.failed = self.skipped = 0
        self.expected_tiles, self.tiles_done = tile_steps or 0, 0
        self.t0, self.interval, self.stream = time.monotonic(), interval, stream or sys.stderr
        self.enabled = enabled
        self.bars = enabled and getattr(self.stream, "isatty", lambda: False)()
        self._last_line = self.t0
        if self.bars:
            self.images = tqdm(total=images, desc=label, unit="img", position=0, file=self.stream)
            self.tile_steps = tqdm(total=self.expected_tiles or None, desc="tile-steps", unit="tile", position=1,
                                   smoothing=0.1, file=self.stream)

    # --- counting -------------------------------------------------------------------------------
    def image(self, ok: bool) -> None:
        """A rendered image landed (ok or failed)."""
        self.failed += not ok
        self.new += 1
        self._advance(1)

    def skip(self, n: int = 1) -> None:
        """Images found done already (in the manifest, or recovered from their files)."""
        self.skipped += n
        self._advance(n)

    def drop(self, n: int = 1) -> None:
        """Images the plan counted but will not render (duplicates)."""
        self.total -= n
        if self.bars:
            self.images.total = self.total
            self.images.refresh()

    def expect_tiles(self, n: int) -> None:
        self.expected_tiles += n
        if self.bars:
            self.tile_steps.total = self.expected_tiles
            self.tile_steps.refresh()

    def tiles(self, n: int) -> None:
        self.tiles_done += n
        if self.bars:
            self.tile_steps.update(n)

    def tiles_to(self, n: int) -> None:
        """Set the tile-step count (bulk mode reads a counter that workers add to)."""
        if n > self.tiles_done:
            self.tiles(n - self.tiles_done)

    # --- showing --------------------------------------------------------------------------------
    def _advance(self, n: int) -> None:
        self.done += n
        if not self.total_known:
            self.total = max(self.total, self.done)
        if self.bars:
            self.images.update(n)
            if self.failed or self.skipped:
                self.images.set_postfix(skipped=self.skipped, failed=self.failed)
        elif self.enabled and time.monotonic() - self._last_line >= self.interval:
            self.print_line()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = self.new / elapsed
        left = max(self.total - self.done, 0)
        eta = _eta(left / rate) if rate > 0 and self.total_known else "?"
        return (f"tessera: {self.done}/{self.total if self.total_known else '?'} {self.label} "
                f"({self.skipped} already done, {self.failed} failed), {rate * 60:.1f} images/min, ETA {eta}")

    def print_line(self) -> None:
        self._last_line = time.monotonic()
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bars:
            self.tile_steps.close()
            self.images.close()
            self.bars = False
        elif self.enabled:
            self.print_line()
            self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
