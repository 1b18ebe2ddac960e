"""What a start imports: gguf-py's constants without the rest of its package (formats._GGUFPackage), Numba without
PyYAML where it has no config file to read (_numba_env.import_numba), numpy arrays typed without numpy.ma
(_numba_env.plain_array_typeof). Each must leave everything working as before for whoever asks for more."""
import json
import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest


def run(code: str, cwd, *args) -> dict:
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, timeout=300, env=dict(os.environ))
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


READ = '''
    import json, sys
    from edgeq.formats.gguf_file import GGUFFile
    gf = GGUFFile(sys.argv[1])
    out = {"arch": gf.arch, "tensors": len(gf.tensors),
           "loaded": [m for m in ("gguf.gguf_writer", "gguf.gguf_reader", "gguf.vocab", "gguf.metadata", "yaml",
                                  "sentencepiece") if m in sys.modules]}
    import gguf
    out["writer"] = gguf.GGUFWriter.__name__
    from gguf import GGUFReader
    r = GGUFReader(sys.argv[1])
    out["reader_tensors"] = len(r.tensors)
    out["same_enum"] = gguf.GGMLQuantizationType is gguf.constants.GGMLQuantizationType
    out["plain_module"] = type(gguf).__name__ == "module"
    import gguf.quants
    out["dequantize"] = callable(gguf.quants.dequantize)
    from edgeq.formats import write_gguf
    out["write_gguf"] = write_gguf.__module__
    print(json.dumps(out))
'''


def test_reading_a_file_imports_only_the_constants_of_gguf(smollm2_path, tmp_path):
    out = run(READ, tmp_path, smollm2_path)
    assert out["arch"] == "llama" and out["tensors"] == out["reader_tensors"] == 272
    assert out["loaded"] == [], "reading a file imported the rest of gguf-py"
    # the first name asked of the package runs its __init__ in place: one set of enums, a plain module after
    assert out["writer"] == "GGUFWriter" and out["same_enum"] and out["plain_module"] and out["dequantize"]
    assert out["write_gguf"] == "edgeq.formats.gguf_write"


def test_gguf_imported_first_stays_as_it_is(tmp_path):
    out = run('''
        import json, sys
        import gguf
        import edgeq.formats
        print(json.dumps({"plain": type(sys.modules["gguf"]).__name__ == "module", "reader": "gguf.gguf_reader" in sys.modules}))
    ''', tmp_path)
    assert out == {"plain": True, "reader": True}


YAML = '''
    import json, sys
    import edgeq.cpu_kernels
    from numba.core import config
    out = {"yaml_in_numba": "yaml" in sys.modules, "have_yaml": config._HAVE_YAML}
    import yaml
    out["yaml_later"] = yaml.safe_load("a: 1") == {"a": 1}
    out["opt"] = int(config.OPT)
    print(json.dumps(out))
'''


def test_numba_imports_without_yaml_unless_it_has_a_config_file(tmp_path):
    pytest.importorskip("yaml")
    out = run(YAML, tmp_path)
    assert not out["yaml_in_numba"] and not out["have_yaml"] and out["yaml_later"]
    # with a .numba_config.yaml in the working directory Numba reads it, as ever
    (tmp_path / ".numba_config.yaml").write_text("opt: '2'\n")
    env_opt = os.environ.pop("NUMBA_OPT", None)
    try:
        out = run(YAML, tmp_path)
    finally:
        if env_opt is not None:
            os.environ["NUMBA_OPT"] = env_opt
    assert out["yaml_in_numba"] and out["have_yaml"] and out["opt"] == 2


def test_plain_arrays_are_typed_as_numba_types_them():
    import edgeq.cpu_kernels  # noqa: F401  (installs the typing)
    from numba.core import errors
    from numba.core.typing import typeof

    assert getattr(typeof.typeof_impl.dispatch(np.ndarray), "edgeq_plain", False)
    base = np.arange(48, dtype=np.float32).reshape(6, 8)
    readonly = np.frombuffer(b"\x01\x02\x03\x04", dtype=np.uint8)
    arrays = [base, np.asfortranarray(base.astype(np.float16)), base[:, ::2], base[::2].astype(np.int8), readonly,
              np.array(3.5), np.zeros((2, 0, 3), dtype=np.bool_), np.zeros(4, dtype=np.complex64),
              np.zeros(3, dtype=[("a", np.int32), ("b", np.float64)]), np.zeros(5, dtype="datetime64[s]"),
              np.array([object()])]
    for a in arrays:
        assert numba.typeof(a) == typeof._typeof_ndarray(a, None), a.dtype
    for dtype in ("V8", [("a", "O"), ("b", "V3")]):  # dtypes Numba cannot type: the same error
        with pytest.raises(errors.NumbaValueError) as ours:
            numba.typeof(np.zeros(2, dtype=dtype))
        with pytest.raises(errors.NumbaValueError) as numbas:
            typeof._typeof_ndarray(np.zeros(2, dtype=dtype), None)
        assert str(ours.value) == str(numbas.value)

    class Sub(np.ndarray):
        pass

    assert numba.typeof(base.view(Sub)) == typeof._typeof_ndarray(base.view(Sub), None)
    masked = np.ma.masked_array([1.0, 2.0], mask=[False, True])
    with pytest.raises(errors.NumbaTypeError):  # still refused, by Numba's own check
        numba.typeof(masked)


def test_a_start_does_not_import_numpy_ma(tmp_path):
    out = run('''
        import json, sys
        import numpy as np, numba
        import edgeq.cpu_kernels
        from edgeq.cpu_kernels import ops
        x = np.ones((3, 8), dtype=np.float32)
        ops.rmsnorm(x, np.ones(8, dtype=np.float32), 1e-5)
        print(json.dumps({"ma": "numpy.ma" in sys.modules, "t": str(numba.typeof(x))}))
    ''', tmp_path)
    assert out == {"ma": False, "t": "array(float32, 2d, C)"}
