"""Constrained decoding with llguidance (the grammar engine llama.cpp uses): JSON, JSON Schema, Lark.

llguidance needs the vocabulary as bytes and an encoder; both come from our own tokenizer
(edgeq.runtime.tokenizer), so any GGUF vocabulary works, with no Hugging Face tokenizer files.

    vocab = GrammarVocab(model.tokenizer, model.cfg.n_vocab)     # once per model (~1 s)
    c = Constraint(vocab, json_schema_grammar({"type": "object"}))
    logits[~c.allowed()] = -inf; tok = sample(logits); c.consume(tok)
"""
from __future__ import annotations

import json

import numpy as np

from edgeq.errors import EdgeqError


class GrammarError(EdgeqError):
    """A schema or grammar the constraint engine refuses (the request's fault)."""


class _Encoder:
    """What llguidance's TokenizerWrapper reads: tokens as bytes, special ids, and str -> ids."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_token_id = tok.eos_id if tok.eos_id is not None else 0
        self.bos_token_id = tok.bos_id
        self.tokens = [tok.token_bytes(i) for i in range(tok.vocab_size)]
        self.special_token_ids = sorted(tok.special_ids)

    def __call__(self, text):
        if isinstance(text, bytes):  # the wrapper probes with bytes: take str only (exact for our encoder)
            raise TypeError("str only")
        return self.tok.encode(text, add_special=False, parse_special=False)


class GrammarVocab:
    """llguidance's view of a vocabulary; build once per model, share between requests."""

    def __init__(self, tokenizer, n_vocab: int):
        import llguidance
        from llguidance._tokenizer import TokenizerWrapper

        self.n_vocab = n_vocab
        eog = sorted(tokenizer.eog_ids) or None
        self.ll = llguidance.LLTokenizer(TokenizerWrapper(_Encoder(tokenizer)), n_vocab=max(n_vocab, tokenizer.vocab_size),
                                         eos_token=eog)


def json_schema_grammar(schema: dict | None) -> str:
    """The grammar for JSON text matching `schema` (None: any JSON object). Compact whitespace: a small model
    given free whitespace can spend its whole budget on newlines."""
    import llguidance

    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    try:
        g = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})
    except (ValueError, TypeError, RuntimeError) as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None
    return _validated(g, "JSON schema")


def lark_grammar(source: str) -> str:
    """A Lark grammar (llguidance's dialect: `%json {schema}` embeds a JSON schema)."""
    import llguidance

    return _validated(llguidance.LLMatcher.grammar_from_lark(source), "grammar")


def _validated(grammar: str, what: str) -> str:
    import llguidance

    err = llguidance.LLMatcher.validate_grammar(grammar)
    if err and not err.startswith("WARNING"):
        raise GrammarError(f"invalid {what}: {err.splitlines()[0]}")
    return grammar


class Constraint:
    """One request's grammar state: which tokens may come next, and the tokens taken so far."""

    def __init__(self, vocab: GrammarVocab, grammar: str):
        import llguidance

        self.vocab = vocab
        limits = llguidance.LLParserLimits(max_grammar_size=200_000)  # bounded work per schema
        self.m = llguidance.LLMatcher(vocab.ll, grammar, log_level=0, limits=limits)
        if self.m.is_error():
            raise GrammarError(f"invalid grammar: {self.m.get_error()}")

    def allowed(self) -> np.ndarray:
        """Boolean mask (n_vocab,) of the tokens the grammar accepts next (end of sequence included once the
        text is complete)."""
        bits = np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little").astype(bool)
        n = self.vocab.n_vocab
        if mask.shape[0] < n:
            mask = np.concatenate([mask, np.zeros(n - mask.shape[0], bool)])
        if self.m.is_error():
            raise GrammarError(f"grammar failed: {self.m.get_error()}")
        return mask[:n]

    def consume(self, token: int) -> None:
        if not self.m.consume_token(int(token)) or self.m.is_error():
            raise GrammarError(f"grammar rejected token {token}: {self.m.get_error()}")

    @property
    def done(self) -> bool:
        """No token can follow (the text is complete and nothing may be appended)."""
        return self.m.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.m.is_accepting()
