"""`edgeq perplexity MODEL -f TEXT`: llama-perplexity's method; --save-logits / --kl-base for KL-divergence."""
from __future__ import annotations

import json
import sys

from edgeq.progress import Progress


def add_arguments(p):
    p.add_argument("model", help="GGUF file or catalog name")
    p.add_argument("-f", "--file", required=True, help="plain UTF-8 text")
    p.add_argument("--ctx", type=int, default=512, help="window size in tokens (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="evaluate at most this many windows")
    p.add_argument("-t", "--threads", type=int, default=None)
    from edgeq.cli.common import add_device_arg

    add_device_arg(p)
    p.add_argument("--save-logits", default=None, help="store the top log-probs of this run (reference for --kl-base)")
    p.add_argument("--force", action="store_true", help="overwrite the --save-logits file if it exists")
    p.add_argument("--kl-base", default=None, help="report KL-divergence and same-top-token %% against a saved run")
    from edgeq.cli.common import add_cache_args, add_mmap_arg

    add_cache_args(p)
    add_mmap_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON line")


def main(a) -> int:
    from edgeq.errors import EdgeqError
    from edgeq.file_checks import check_input_file, check_output_path
    from edgeq.runtime.engine import load
    from edgeq.runtime.perplexity import perplexity_file

    # refused before the model loads; the text itself is read only as far as --chunks needs
    check_input_file(a.file, "text file")
    if a.save_logits:
        check_output_path(a.save_logits, a.force)
    if a.kl_base:
        check_input_file(a.kl_base, "reference logits file")
    if a.ctx < 8:
        raise EdgeqError("--ctx must be at least 8")
    if a.chunks is not None and a.chunks < 1:
        raise EdgeqError("--chunks must be at least 1")
    from edgeq.cli.common import device_choice, note_device

    model = load(a.model, n_ctx=max(a.ctx, 16), threads=a.threads,
                 cache_type_k=a.cache_type_k, cache_type_v=a.cache_type_v, device=device_choice(a),
                 mmap=a.mmap)
    note_device(model, a)
    bar = Progress(1, label="perplexity ")

    def on_chunk(i: int, n: int, ppl: float) -> None:
        bar.total = n
        bar.update(i, detail=f"{i}/{n} windows, ppl {ppl:8.3f}")

    res = perplexity_file(model, a.file, a.ctx, a.chunks, a.save_logits, a.kl_base, on_chunk=on_chunk, force=a.force)
    bar.clear()
    if a.json:
        rec = {"ppl": res.ppl, "stderr": res.stderr, "tokens": res.tokens, "chunks": res.chunks,
               "n_ctx": a.ctx, "seconds": round(res.seconds, 2), "model": str(model.path.name),
               "device": model.device}
        if res.kl is not None:
            rec.update(kl=res.kl, kl_stderr=res.kl_stderr, same_top=res.same_top)
        print(json.dumps(rec))
    else:
        print(f"PPL = {res.ppl:.4f} +/- {res.stderr:.4f}  ({res.tokens} tokens, {res.chunks} windows of {a.ctx}, "
              f"{res.seconds:.1f} s)")
        if res.kl is not None:
            print(f"KL-divergence = {res.kl:.6f} +/- {res.kl_stderr:.6f}   same top token = {100 * res.same_top:.2f} %")
    sys.stdout.flush()
    return 0
