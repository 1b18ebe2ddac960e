"""edgeq.formats: the GGUF container and the quantization codecs (numpy reference)."""
from edgeq.formats.errors import FormatError
from edgeq.formats.quants import QTYPES, block_bytes, block_size, dequantize, quantize
from edgeq.formats.gguf_file import GGUFFile, TensorInfo
from edgeq.formats.gguf_write import write_gguf

__all__ = [
    "FormatError", "QTYPES", "block_bytes", "block_size", "quantize", "dequantize",
    "GGUFFile", "TensorInfo", "write_gguf",
]
