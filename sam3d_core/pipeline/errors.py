"""Why a reconstruction stopped, as types the CLI, the worker and the app route on (never on message text)."""

from __future__ import annotations


class ReconstructionError(RuntimeError):
    """A reconstruction that cannot finish for a reason the user can act on; the message says how."""


class GPUOutOfMemory(ReconstructionError):
    """CUDA ran out of memory even in low-VRAM mode."""


class EmptyMeshError(ReconstructionError):
    """Stage 2 (or, without stage 2, stage 1's occupancy) produced no surface for an object."""


def is_out_of_memory(e: BaseException) -> bool:
    """A CUDA (or CPU allocator) out-of-memory error. torch.cuda.OutOfMemoryError is a RuntimeError whose
    message says "out of memory", so no torch import is needed here."""
    return isinstance(e, (RuntimeError, MemoryError)) and "out of memory" in str(e).lower()
