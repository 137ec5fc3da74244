"""lion8bit: the Lion optimizer with 8-bit (or bf16 / fp32) momentum and a fused update."""

from .groups import param_groups
from .optimizer import Lion, Lion8bit, PagedLion8bit

__all__ = ["Lion", "Lion8bit", "PagedLion8bit", "param_groups"]
__version__ = "0.1.0"
