"""edgeq: an offline LLM runner for laptops and edge devices."""
from edgeq import _numba_env  # noqa: F401  (must run before numba is imported anywhere)

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a GGUF model (path or catalog name) and return an `edgeq.runtime.engine.Model`."""
    from edgeq.runtime.engine import load as _load

    return _load(path, **kwargs)
