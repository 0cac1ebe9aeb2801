"""MeSO's optimizer-state memory, against torch.optim.AdamW."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryReport:
    """Optimizer-state bytes of MeSO against torch.optim.AdamW with float32 moments.

    ``moment_bytes`` counts exp_avg + exp_avg_sq of every parameter (sketch-space for the compressed
    ones), ``adamw_moment_bytes`` is 2 * numel * 4 for the same parameters, ``sketch_bytes`` the
    sketch matrices (identity sides cost nothing; a matrix shared by several parameters counts once).
    Step counters are ignored. The ``adamw_compressed_bytes`` field is the AdamW figure restricted
    to the compressed parameters, for the per-layer saving."""
    compressed_moment_bytes: int
    dense_moment_bytes: int
    sketch_bytes: int
    adamw_moment_bytes: int
    adamw_compressed_bytes: int
    num_compressed: int
    num_dense: int

    @property
    def moment_bytes(self) -> int:
        return self.compressed_moment_bytes + self.dense_moment_bytes

    @property
    def total_bytes(self) -> int:
        return self.moment_bytes + self.sketch_bytes

    @property
    def ratio(self) -> float:
        """MeSO total (moments + sketches) over AdamW moments."""
        return self.total_bytes / self.adamw_moment_bytes if self.adamw_moment_bytes else float("nan")

    def to_dict(self) -> dict:
        return {"compressed_moment_bytes": self.compressed_moment_bytes,
                "dense_moment_bytes": self.dense_moment_bytes, "moment_bytes": self.moment_bytes,
                "sketch_bytes": self.sketch_bytes, "total_bytes": self.total_bytes,
                "adamw_moment_bytes": self.adamw_moment_bytes,
                "adamw_compressed_bytes": self.adamw_compressed_bytes,
                "num_compressed": self.num_compressed, "num_dense": self.num_dense, "ratio": self.ratio}
