"""Perplexity with llama-perplexity's method, and KL-divergence against saved reference logits.

Windows of n_ctx tokens, non-overlapping, tail dropped; BOS as the first token of each window when the
model adds one; each window evaluated from an empty cache; positions n_ctx//2 .. n_ctx-2 scored (each
predicting the next token). PPL = exp(mean NLL); stderr = PPL * std(NLL) / sqrt(N).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TOP_K_SAVED = 64  # reference log-probs kept per scored position for KL-divergence


@dataclass
class PerplexityResult:
    ppl: float
    stderr: float
    tokens: int            # scored tokens
    chunks: int
    seconds: float
    kl: float | None = None
    kl_stderr: float | None = None
    same_top: float | None = None  # fraction of positions whose argmax equals the reference's
    extra: dict = field(default_factory=dict)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))


def text_tokens(model, text: str) -> list[int]:
    return model.tokenizer.encode(text.replace("\r\n", "\n"), add_special=True, parse_special=False)


def file_tokens(model, path, max_tokens: int | None = None) -> np.ndarray:
    """The tokens of a text file, read and tokenized a piece at a time (edgeq.file_checks.text_pieces) and
    only until `max_tokens` are there: scoring 1,024 tokens of a 50 MB file reads one piece. Pieces end at
    line (or word) boundaries, so the tokens are those of the whole text (a SentencePiece vocabulary that
    prefixes a space may differ by a token at a seam, once a megabyte)."""
    from edgeq.file_checks import text_pieces

    tok = model.tokenizer
    parts = [np.asarray([tok.bos_id] if tok.add_bos else [], dtype=np.int32)]
    n, complete = len(parts[0]), True
    for piece in text_pieces(path):
        ids = np.asarray(tok.encode(piece.replace("\r\n", "\n"), add_special=False, parse_special=False),
                         dtype=np.int32)  # int32, not a list of Python ints: 4 bytes a token
        parts.append(ids)
        n += len(ids)
        if max_tokens is not None and n >= max_tokens:
            complete = False
            break
    if complete and tok.add_eos:
        parts.append(np.asarray([tok.eos_id], dtype=np.int32))
    return np.concatenate(parts)


def perplexity(model, text: str, n_ctx: int = 512, max_chunks: int | None = None, save_logits: str | None = None,
               kl_base: str | None = None, on_chunk=None, force: bool = False) -> PerplexityResult:
    """Perplexity over a text held in memory; perplexity_file reads a file only as far as it needs."""
    _check_args(model, n_ctx, save_logits, kl_base, force)
    return _perplexity(model, text_tokens(model, text), n_ctx, max_chunks, save_logits, kl_base, on_chunk)


def perplexity_file(model, path, n_ctx: int = 512, max_chunks: int | None = None, save_logits: str | None = None,
                    kl_base: str | None = None, on_chunk=None, force: bool = False) -> PerplexityResult:
    """Perplexity over a UTF-8 text file (a regular file: a FIFO or /dev/zero is refused)."""
    _check_args(model, n_ctx, save_logits, kl_base, force)
    tokens = file_tokens(model, path, n_ctx * max_chunks if max_chunks else None)
    return _perplexity(model, tokens, n_ctx, max_chunks, save_logits, kl_base, on_chunk)


def _check_args(model, n_ctx: int, save_logits, kl_base, force: bool) -> None:
    """Everything that can be refused before the long part: the context, the output and reference files."""
    from edgeq.errors import EdgeqError
    from edgeq.file_checks import check_input_file, check_output_path

    if n_ctx > model.n_ctx:
        raise EdgeqError(f"--ctx {n_ctx} exceeds the model context {model.n_ctx}")
    if save_logits:
        check_output_path(save_logits, force)
    if kl_base:
        check_input_file(kl_base, "reference logits file")


def _perplexity(model, tokens, n_ctx: int, max_chunks: int | None, save_logits: str | None, kl_base: str | None,
                on_chunk) -> PerplexityResult:
    from edgeq.errors import EdgeqError

    n_chunk = len(tokens) // n_ctx
    if max_chunks:
        n_chunk = min(n_chunk, max_chunks)
    if n_chunk < 1:
        raise EdgeqError(f"text has {len(tokens)} tokens: need at least {n_ctx} (one window)")
    base = _load_base(kl_base, n_ctx, tokens, n_chunk) if kl_base else None
    first = n_ctx // 2
    bos = model.tokenizer.bos_id if model.tokenizer.add_bos else None
    nll, kls, same, saved = [], [], [], {"ids": [], "logp": [], "rest": [], "argmax": []}
    t0 = time.perf_counter()
    for c in range(n_chunk):
        win = [int(t) for t in tokens[c * n_ctx:(c + 1) * n_ctx]]
        if bos is not None:
            win[0] = bos
        logits = model.logits(win)[first:n_ctx - 1]
        logp = _log_softmax(logits)
        tgt = np.asarray(win[first + 1:n_ctx])
        nll.append(-logp[np.arange(len(tgt)), tgt])
        if save_logits:
            top = np.argpartition(-logp, TOP_K_SAVED, axis=1)[:, :TOP_K_SAVED]
            tl = np.take_along_axis(logp, top, axis=1)
            saved["ids"].append(top.astype(np.int32))
            saved["logp"].append(tl.astype(np.float32))
            saved["rest"].append(np.log1p(-np.minimum(np.exp(tl).sum(axis=1), 1 - 1e-12)).astype(np.float32))
            saved["argmax"].append(logp.argmax(axis=1).astype(np.int32))
        if base is not None:
            k, s = _kl_chunk(base, c, logp)
            kls.append(k)
            same.append(s)
        if on_chunk:
            on_chunk(c + 1, n_chunk, float(np.exp(np.concatenate(nll).mean())))
    dt = time.perf_counter() - t0
    allnll = np.concatenate(nll)
    ppl = float(np.exp(allnll.mean()))
    res = PerplexityResult(ppl, float(ppl * allnll.std(ddof=1) / np.sqrt(len(allnll))), len(allnll), n_chunk, dt)
    if save_logits:
        _save_base(save_logits, n_ctx, tokens, n_chunk, saved)
    if base is not None:
        allkl = np.concatenate(kls)
        res.kl = float(allkl.mean())
        res.kl_stderr = float(allkl.std(ddof=1) / np.sqrt(len(allkl)))
        res.same_top = float(np.concatenate(same).mean())
    return res


def _tokens_digest(tokens, n_ctx, n_chunk) -> str:
    return hashlib.sha256(np.asarray(tokens[:n_ctx * n_chunk], dtype=np.int32).tobytes()).hexdigest()


def _save_base(path: str, n_ctx: int, tokens, n_chunk: int, saved: dict) -> None:
    arrays = {k: np.concatenate(v) for k, v in saved.items()}
    path = Path(path).expanduser()
    from edgeq.formats.gguf_write import atomic_output

    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, n_ctx=n_ctx, n_chunk=n_chunk, digest=_tokens_digest(tokens, n_ctx, n_chunk),
                            **arrays)


def _load_base(path: str, n_ctx: int, tokens, n_chunk: int) -> dict:
    from edgeq.errors import EdgeqError

    try:
        z = np.load(path)
        base = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise EdgeqError(f"cannot read reference logits {path}: {e}")
    if int(base["n_ctx"]) != n_ctx or int(base["n_chunk"]) < n_chunk or \
            str(base["digest"]) != _tokens_digest(tokens, n_ctx, int(base["n_chunk"])):
        raise EdgeqError(f"{path} was saved for another text, context size or tokenizer")
    return base


def _kl_chunk(base: dict, c: int, logp: np.ndarray):
    """KL(P_ref || P_this) per position over the reference's top-K tokens plus the remaining mass."""
    n = logp.shape[0]
    ids = base["ids"][c * n:(c + 1) * n]
    lp_ref = base["logp"][c * n:(c + 1) * n].astype(np.float64)
    rest_ref = base["rest"][c * n:(c + 1) * n].astype(np.float64)
    lq = np.take_along_axis(logp, ids, axis=1)
    p = np.exp(lp_ref)
    rest_q = np.log(np.maximum(1.0 - np.exp(lq).sum(axis=1), 1e-12))
    kl = (p * (lp_ref - lq)).sum(axis=1) + np.exp(rest_ref) * (rest_ref - rest_q)
    same = logp.argmax(axis=1) == base["argmax"][c * n:(c + 1) * n]
    return np.maximum(kl, 0.0), same
