"""The one resumable runner of the attack side: a row's work cut into pieces, each stored as a part on disk.

A row (a white-box (target, norm, ε), or a black-box run) is computed in pieces — batches of examples —
that depend only on the selection and the batch size, each seeded by its own position. Every finished
piece is written atomically as a part (``RUN/parts/NAME/BBBBB.json``), so a kill loses only the piece in
progress and a re-run computes only the missing ones; Ctrl-C says how many pieces were kept
(:class:`infra.interrupt.Interrupted`). Under ``torchrun`` (any initialised
``torch.distributed`` group) rank r computes the pieces b with b % world == r; after a barrier rank 0
reads every part back and merges them into the row, so the row is the row of one process whatever the
world size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from infra.interrupt import Interrupted
from infra.records import Parts

from .common import barrier, world_position

log = logging.getLogger(__name__)


class PartsRunner:
    """Compute the pieces of one row, shared over ranks, and hand rank 0 every piece in order.

    Args:
        run_dir: the run folder.
        name: names the row and everything that shapes its pieces (e.g. ``KEY-bs64``).
        n_pieces: how many pieces make the row.
    """

    def __init__(self, run_dir: str | Path, name: str, n_pieces: int) -> None:
        self.parts = Parts(run_dir, name, n_pieces)
        self.rank, self.world = world_position()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def run(self, compute: Callable[[int], dict[str, Any]], *, desc: str = "",
            progress: bool = False) -> list[dict[str, Any]] | None:
        """Compute this rank's missing pieces (``compute(b)`` -> a JSON-able dict), wait for every rank, and
        return all pieces in order on rank 0 (None on the other ranks)."""
        mine = [b for b in range(self.rank, self.parts.n_batches, self.world) if not self.parts.has(b)]
        try:
            with tqdm(mine, desc=desc, unit="piece", leave=False, disable=not progress) as bar:  # closed on errors
                for b in bar:
                    self.parts.write(b, {**compute(b), "shard": f"{self.rank}/{self.world}"})
        except KeyboardInterrupt:
            raise Interrupted(f"{self.on_disk()} of {self.parts.n_batches} pieces of the row in progress "
                              f"({desc or self.parts.dir.name}) in {self.parts.dir}") from None
        barrier()
        if not self.is_main:
            return None
        pieces = self.parts.read_all()
        if pieces is None:  # a rank failed to write its part (it raised, so torchrun stops the job)
            raise RuntimeError(f"parts of {self.parts.dir.name} are missing in {self.parts.dir}")
        return pieces

    def on_disk(self) -> int:
        """Pieces already stored."""
        return sum(self.parts.has(b) for b in range(self.parts.n_batches))

    def finish(self) -> None:
        """After the row is appended (rank 0): delete its parts. Also removes parts left by a kill between a
        row's append and this clean-up."""
        if self.is_main:
            self.parts.remove()
