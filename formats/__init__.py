"""edgeq.formats: the GGUF container and the quantization codecs (numpy reference)."""
import importlib
import importlib.util
import sys
import threading
import types


class _GGUFPackage(types.ModuleType):
    """gguf-py's package before its `__init__` has run: `gguf.constants` (the type ids, block sizes and key names that
    reading a file needs) is loaded; the rest (reader, writer, tensor maps, its vocab module with sentencepiece, its
    metadata module with yaml: 53-80 ms of every start, against 9 for the constants) is imported at the first name
    asked of the package itself (`gguf.GGUFWriter`, `from gguf import GGUFReader`), in place, by the package's own
    `__init__`."""
    _lock = threading.RLock()

    def __getattr__(self, name):  # only for names the package does not have yet
        with self._lock:
            if type(self) is _GGUFPackage:
                self.__class__ = types.ModuleType  # a miss while __init__ runs is a plain miss
                try:
                    self.__spec__.loader.exec_module(self)
                except BaseException:
                    self.__class__ = _GGUFPackage
                    raise
        return types.ModuleType.__getattribute__(self, name)


def _gguf_constants() -> None:
    if "gguf" in sys.modules:
        return
    spec = importlib.util.find_spec("gguf")
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return  # not installed, or laid out otherwise: the imports below fail or work as they would anyway
    package = importlib.util.module_from_spec(spec)
    package.__class__ = _GGUFPackage
    sys.modules["gguf"] = package
    try:
        importlib.import_module("gguf.constants")
    except BaseException:
        del sys.modules["gguf"]
        raise


_gguf_constants()

from edgeq.formats.errors import FormatError  # noqa: E402
from edgeq.formats.quants import QTYPES, block_bytes, block_size, dequantize, quantize  # noqa: E402
from edgeq.formats.gguf_file import GGUFFile, TensorInfo  # noqa: E402

__all__ = [
    "FormatError", "QTYPES", "block_bytes", "block_size", "quantize", "dequantize",
    "GGUFFile", "TensorInfo", "write_gguf",
]


def __getattr__(name):
    if name == "write_gguf":  # gguf-py's writer under it: imported when asked for
        from edgeq.formats.gguf_write import write_gguf

        return write_gguf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
