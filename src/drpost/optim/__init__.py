"""Optimizers. ``MeSO``: AdamW whose moments live in a per-layer sketch space (see ``meso``)."""
from .meso import (MemoryReport, MeSO, compress, decompress, draw_sketches, sketch_seed, transport_map,
                   transport_moments)

__all__ = ["MeSO", "MemoryReport", "compress", "decompress", "draw_sketches", "sketch_seed",
           "transport_map", "transport_moments"]
