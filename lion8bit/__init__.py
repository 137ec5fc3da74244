"""lion8bit: the Lion optimizer with 8-bit (or bf16 / fp32) momentum and a fused update."""

from .optimizer import Lion, Lion8bit, PagedLion8bit

__all__ = ["Lion", "Lion8bit", "PagedLion8bit"]
__version__ = "0.1.0"
