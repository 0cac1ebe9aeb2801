"""Optimizers. ``MeSO``: AdamW whose moments live in a per-layer sketch space (see ``meso``; its sketch
space in ``sketches``, the moment transport at a refresh in ``transport``, its memory in ``memory``)."""
from .memory import MemoryReport
from .meso import MeSO
from .sketches import compress, decompress, draw_sketches, sketch_seed
from .transport import transport_map, transport_moments

__all__ = ["MeSO", "MemoryReport", "compress", "decompress", "draw_sketches", "sketch_seed",
           "transport_map", "transport_moments"]
