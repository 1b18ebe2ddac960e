"""The converter: a Hugging Face checkpoint → one GGUF file (`convert`), a GGUF file → another type
(`quantize_file`). Both stream tensors through writer.write_model with a recipe from mixes.py and an
optional importance matrix (imatrix.py, calibrate.py)."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edgeq.errors import EdgeqError

_FLOAT = ("F32", "F16", "BF16")


@dataclass
class QuantOptions:
    """How to quantize: the file type and its per-tensor rules, and where importance comes from."""

    qtype: str = "F16"
    pure: bool = False                  # one type for every matrix (no per-tensor rules)
    output_type: str | None = None      # type of output.weight
    embedding_type: str | None = None   # type of token_embd.weight
    imatrix: str | None = None          # importance matrix file (llama.cpp GGUF or legacy .dat)
    calibrate: str | None = None        # text (file or known name) to collect an importance matrix on
    method: str = "best"                # with calibrate: imatrix | gptq | best (convert/gptq.py)
    save_imatrix: str | None = None     # write the collected importance matrix here
    chunks: int = 32                    # calibration windows
    calib_ctx: int = 512                # calibration window in tokens
    threads: int | None = None          # calibration threads
    quiet: bool = True                  # no progress output
    force: bool = False                 # overwrite existing output files (output, save_imatrix)

    @classmethod
    def of(cls, obj: Any) -> "QuantOptions":
        """From any object with these attributes (a verb's parsed arguments)."""
        return cls(**{f.name: getattr(obj, f.name) for f in fields(cls) if hasattr(obj, f.name)})

    def recipe(self, n_layer: int, n_gqa: int = 1, tied: bool = False):
        from edgeq.convert.mixes import Recipe

        return Recipe(self.qtype.upper(), n_layer=n_layer, n_gqa=n_gqa, tied=tied, pure=self.pure,
                      output_type=self.output_type, embedding_type=self.embedding_type)

    def check_paths(self, output) -> Path:
        """Before any work: outputs writable and not clobbered (see check_output_path), inputs regular files."""
        from edgeq.convert.writer import check_output_path
        from edgeq.file_checks import check_input_file

        out = check_output_path(output, self.force)
        if self.save_imatrix:
            check_output_path(self.save_imatrix, self.force)
        if self.imatrix:
            check_input_file(self.imatrix, "imatrix file")
        return out


def _check_method(opts: QuantOptions, arch: str) -> None:
    """awq-gptq on an architecture it cannot be folded into: refused before any calibration runs."""
    if opts.method == "awq-gptq" and (opts.calibrate or opts.imatrix):
        from edgeq.convert.awq import check_arch

        check_arch(arch)


def convert(src: str | os.PathLike, output: str | os.PathLike, qtype: str = "F16", *, imatrix=None,
            options: QuantOptions | None = None, **option_kw) -> dict[str, Any]:
    """Convert a checkpoint (folder or hub repo id) into one GGUF file; returns write_model's stats.

    `imatrix`: an Imatrix object to use as it is; options (or their keywords) say everything else."""
    from edgeq.convert import hf_to_gguf
    from edgeq.convert.calibrate import resolve_imatrix
    from edgeq.convert.hf_checkpoint import HFCheckpoint
    from edgeq.convert.mixes import Recipe
    from edgeq.convert.hf_checkpoint import resolve_source
    from edgeq.convert.writer import OutTensor, write_model
    from edgeq.file_checks import check_input_file

    opts = options or QuantOptions(qtype=qtype, **option_kw)
    out = opts.check_paths(output)
    folder = resolve_source(src, quiet=opts.quiet)
    for f in folder.iterdir():  # a FIFO or device posing as a weights/config file would hang the reader
        if f.suffix in (".safetensors", ".json", ".model"):
            check_input_file(f, "checkpoint file")
    ckpt = HFCheckpoint(folder, quiet=opts.quiet)
    try:
        conv = hf_to_gguf.plan(ckpt)
        _check_method(opts, conv.arch)
        hp = conv.hparams
        tensors = [OutTensor(t.name, t.shape, t.load) for t in conv.tensors]
        recipe = opts.recipe(hp.n_layer, hp.n_gqa, tied="output.weight" not in {t.name for t in tensors})
        matrices = [t.name for t in tensors if len(t.shape) == 2 and t.name != "token_embd.weight"]

        def calibration_model(folder: Path) -> Path:
            path = folder / "calibration-f16.gguf"
            f16 = Recipe("F16", n_layer=hp.n_layer)
            write_model(path, conv.arch, conv.metadata(f16.file_type), tensors, f16, quiet=opts.quiet,
                        label="calibration model ")
            return path

        im = imatrix if imatrix is not None else resolve_imatrix(opts, out, matrices, calibration_model, tensors,
                                                                 recipe)
        recipe.has_imatrix = im is not None
        return write_model(out, conv.arch, conv.metadata(recipe.file_type), tensors, recipe, im, quiet=opts.quiet,
                           method=opts.method)
    finally:
        ckpt.close()


def quantize_file(src_path: str | os.PathLike, out_path: str | os.PathLike, qtype: str | None = None, *,
                  imatrix=None, options: QuantOptions | None = None, **option_kw) -> dict[str, Any]:
    """Requantize a GGUF file: every tensor dequantized to float32 and quantized to the recipe's type.

    `imatrix`: an Imatrix object (with Hessians, from calibrate.calibrate_gguf) to use as it is."""
    from gguf.constants import GGML_QUANT_VERSION, GGUFValueType, Keys

    from edgeq.convert.calibrate import resolve_imatrix
    from edgeq.convert.writer import OutTensor, write_model
    from edgeq.formats.gguf_file import GGUFFile
    from edgeq.formats.gguf_write import INTERNAL_KEYS
    from edgeq.formats.quants import QTYPES, dequantize
    from edgeq.models.base import hparam
    import numpy as np

    opts = options or QuantOptions(qtype=qtype or "F16", **option_kw)
    from edgeq.file_checks import check_input_file

    src_path = check_input_file(src_path, "GGUF file")
    out = opts.check_paths(out_path)
    with GGUFFile(src_path) as gf:
        _check_method(opts, gf.arch)
        n_layer = hparam(gf, gf.arch, "block_count", None)
        if n_layer is None:
            raise EdgeqError(f"{src_path}: no {gf.arch}.block_count: not a model file")
        n_head = hparam(gf, gf.arch, "attention.head_count", 1)
        n_head_kv = hparam(gf, gf.arch, "attention.head_count_kv", n_head) or n_head
        recipe = opts.recipe(int(n_layer), max(1, int(n_head) // int(n_head_kv)),
                             tied="output.weight" not in gf.tensors)
        if not opts.quiet:
            already = sorted({t.qtype for t in gf.tensors.values() if t.qtype not in _FLOAT})
            if already:
                print(f"note: {src_path} is already quantized ({', '.join(already)}): requantizing adds error",
                      file=sys.stderr)

        unreadable = sorted({t.qtype for t in gf.tensors.values() if t.qtype not in QTYPES})
        if unreadable:   # before any output is written
            raise EdgeqError(f"{src_path}: holds {', '.join(unreadable)} tensors, a type edgeq cannot decode "
                             f"(it reads {', '.join(QTYPES)}): quantize from the F16/BF16/F32 original")
        def load(t) -> np.ndarray:
            x = dequantize(t.data, t.qtype, tuple(t.shape))
            gf.release_pages()   # (a copy was made: the RSS holds one tensor, not every page read so far)
            return x

        def rows(t, index) -> np.ndarray:
            by_row = np.asarray(t.data).view(np.uint8).reshape(t.shape[0], -1)[index]
            x = dequantize(by_row, t.qtype, (by_row.shape[0], *t.shape[1:]))
            gf.release_pages()
            return x

        tensors = [OutTensor(t.name, tuple(t.shape), lambda t=t: load(t),
                             (lambda index, t=t: rows(t, index)) if len(t.shape) == 2 else None)
                   for t in gf.tensors.values()]
        matrices = [t.name for t in tensors if len(t.shape) == 2 and t.name != "token_embd.weight"]
        im = imatrix if imatrix is not None else resolve_imatrix(opts, out, matrices, lambda folder: Path(src_path),
                                                                 tensors, recipe)
        recipe.has_imatrix = im is not None

        skip = INTERNAL_KEYS | {Keys.General.FILE_TYPE, Keys.General.QUANTIZATION_VERSION}
        metadata = [(key, value, *gf.metadata_types[key]) for key, value in gf.metadata.items() if key not in skip]
        metadata.append((Keys.General.FILE_TYPE, int(recipe.file_type), GGUFValueType.UINT32, None))
        metadata.append((Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION, GGUFValueType.UINT32, None))
        return write_model(out, gf.arch, metadata, tensors, recipe, im, quiet=opts.quiet, method=opts.method)
