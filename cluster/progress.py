"""A person at the terminal: two tqdm bars, images and tile-steps, each with its ETA."""
from __future__ import annotations

from tqdm.auto import tqdm


class Progress:
    def __init__(self, images: int, tile_steps: int, enabled: bool = True):
        self.images = tqdm(total=images, desc="images", unit="img", position=0, disable=not enabled)
        self.tile_steps = tqdm(total=tile_steps, desc="tile-steps", unit="tile", position=1, disable=not enabled,
                               smoothing=0.1)
        self.failed = 0

    def image(self, ok: bool) -> None:
        self.failed += not ok
        self.images.update(1)
        if self.failed:
            self.images.set_postfix(failed=self.failed)

    def tiles(self, n: int) -> None:
        self.tile_steps.update(n)

    def tiles_to(self, n: int) -> None:
        """Set the tile-step count (bulk mode reads a counter that workers add to)."""
        if n > self.tile_steps.n:
            self.tile_steps.update(n - self.tile_steps.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.tile_steps.close()
        self.images.close()
