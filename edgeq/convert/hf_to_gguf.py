"""What a Hugging Face checkpoint becomes in GGUF: tensor names and layouts, hyperparameters, vocabulary.

The facts (names, metadata keys, token types, the pre-tokenizer hashes) are llama.cpp's, from
convert_hf_to_gguf.py; key names and enums come from `gguf.constants`. What differs between architectures
(defaults, tensor names and shapes, weight transforms such as the Q/K row permutation or Gemma's +1 on
norms) is each model module's `HF` spec (models/base.HFSpec). `plan(ckpt)` checks everything it can before a byte is written and returns a
`Conversion`: metadata as (key, value, type) and one `TensorPlan` per output tensor, each loaded lazily.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from gguf.constants import GGML_QUANT_VERSION, MODEL_TENSOR, TENSOR_NAMES, GGUFValueType, Keys, TokenType

from edgeq.errors import ModelError
from edgeq.convert.hf_checkpoint import HFCheckpoint
from edgeq.models import hf_specs
from edgeq.models.base import HFSpec
from edgeq.models.llama import permute_qk  # noqa: F401  (re-exported: tests check it against the formula)

log = logging.getLogger(__name__)

V = GGUFValueType

# HF `architectures[0]` → the model module's spec
SPECS: dict[str, HFSpec] = {hf: spec for spec in hf_specs() for hf in spec.hf_architectures}
ARCHITECTURES = {hf: spec.arch for hf, spec in SPECS.items()}  # → GGUF architecture
_BY_MODEL_TYPE = {t: spec.hf_architectures[0] for spec in hf_specs() for t in spec.hf_model_types}
_KINDS = {"u32": GGUFValueType.UINT32, "f32": GGUFValueType.FLOAT32, "str": GGUFValueType.STRING,
          "bool": GGUFValueType.BOOL}


class ConversionError(ModelError):
    """The checkpoint cannot be converted (architecture, missing or misshapen tensor, tokenizer)."""


# ------------------------------------------------------------------------------------------------
# Hyperparameters
# ------------------------------------------------------------------------------------------------

@dataclass
class Hparams:
    arch: str                 # GGUF architecture name
    hf_arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rms_eps: float
    rope_theta: float
    tied: bool                # the classifier is the token embedding
    spec: HFSpec = field(repr=False)
    qkv_bias: bool = False
    rope_scaling: dict = field(default_factory=dict)
    rope_theta_local: float | None = None   # sliding-window layers (gemma3)
    head_dim_explicit: bool = False
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Gemma3ForConditionalGeneration nests the language model's config in text_config."""
    tc = cfg.get("text_config")
    return {**cfg, **tc} if isinstance(tc, dict) else cfg


def _rope(cfg: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    """rope_theta/rope_scaling from either the old keys or transformers 5's rope_parameters."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict):
        if layer_type and isinstance(rp.get(layer_type), dict):
            rp = rp[layer_type]
        elif "full_attention" in rp and isinstance(rp["full_attention"], dict):
            rp = rp["full_attention"]
        return dict(rp)
    out = dict(cfg.get("rope_scaling") or {})
    if layer_type == "sliding_attention" and "rope_local_base_freq" in cfg:
        out["rope_theta"] = cfg["rope_local_base_freq"]
    elif "rope_theta" in cfg:
        out["rope_theta"] = cfg["rope_theta"]
    return out


def read_hparams(ckpt: HFCheckpoint) -> Hparams:
    cfg = ckpt.config
    archs = cfg.get("architectures") or []
    hf_arch = archs[0] if archs else None
    if hf_arch is None:  # older checkpoints: infer from model_type
        hf_arch = _BY_MODEL_TYPE.get(cfg.get("model_type"))
    if hf_arch not in SPECS:
        raise ConversionError(f"{ckpt.path}: unsupported architecture {hf_arch or cfg.get('model_type')!r} "
                              f"(supported: {', '.join(ARCHITECTURES)})")
    spec = SPECS[hf_arch]
    tc = _text_config(cfg)
    dflt = spec.defaults

    def get(key: str, default_key: str, default: Any = None):
        value = tc.get(key)
        if value is None:
            value = dflt.get(default_key, default)
        if value is None:
            raise KeyError(key)
        return value

    try:
        n_embd = int(tc["hidden_size"])
        n_head = int(get("num_attention_heads", "n_head"))
        hp = Hparams(
            arch=spec.arch, hf_arch=hf_arch, spec=spec,
            n_vocab=int(tc.get("vocab_size", 0)),
            n_embd=n_embd,
            n_layer=int(tc["num_hidden_layers"]),
            n_ff=int(tc["intermediate_size"]),
            n_head=n_head,
            n_head_kv=int(get("num_key_value_heads", "n_head_kv", n_head)),
            head_dim=int(get("head_dim" if spec.reads_head_dim else "", "head_dim", n_embd // n_head)),
            head_dim_explicit=spec.reads_head_dim and tc.get("head_dim") is not None,
            n_ctx=int(get("max_position_embeddings", "n_ctx")),
            rms_eps=float(get("rms_norm_eps", "rms_eps")),
            rope_theta=float(_rope(tc).get("rope_theta") or dflt["rope_theta"]),
            tied=bool(tc.get("tie_word_embeddings", cfg.get("tie_word_embeddings", dflt["tied"]))),
            rope_theta_local=_rope(tc, "sliding_attention").get("rope_theta"),
            raw=tc,
        )
        hp.qkv_bias = spec.qkv_bias(hp)
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{ckpt.path}/config.json: missing or bad hyperparameter {e}") from None
    scaling = _rope(tc)
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        hp.rope_scaling = scaling
    try:
        spec.check(hp, str(ckpt.path))
    except ModelError as e:
        raise ConversionError(str(e)) from None
    if n_head % hp.n_head_kv:
        raise ConversionError(f"{ckpt.path}: {n_head} heads not divisible by {hp.n_head_kv} KV heads")
    return hp


def metadata(hp: Hparams) -> list[tuple[str, Any, GGUFValueType]]:
    """`<arch>.*` keys, in convert_hf_to_gguf.py's order and with its defaults."""
    a = hp.arch
    m = [
        (Keys.LLM.BLOCK_COUNT.format(arch=a), hp.n_layer, V.UINT32),
        (Keys.LLM.CONTEXT_LENGTH.format(arch=a), hp.n_ctx, V.UINT32),
        (Keys.LLM.EMBEDDING_LENGTH.format(arch=a), hp.n_embd, V.UINT32),
        (Keys.LLM.FEED_FORWARD_LENGTH.format(arch=a), hp.n_ff, V.UINT32),
        (Keys.Attention.HEAD_COUNT.format(arch=a), hp.n_head, V.UINT32),
        (Keys.Attention.HEAD_COUNT_KV.format(arch=a), hp.n_head_kv, V.UINT32),
        (Keys.Rope.FREQ_BASE.format(arch=a), hp.rope_theta, V.FLOAT32),
        (Keys.Attention.LAYERNORM_RMS_EPS.format(arch=a), hp.rms_eps, V.FLOAT32),
    ]
    if hp.head_dim_explicit or hp.spec.write_head_dim:
        m += [(Keys.Attention.KEY_LENGTH.format(arch=a), hp.head_dim, V.UINT32),
              (Keys.Attention.VALUE_LENGTH.format(arch=a), hp.head_dim, V.UINT32)]
    m += [(f"{a}.{key}", value, _KINDS[kind]) for key, value, kind in hp.spec.metadata(hp)]
    rs = hp.rope_scaling
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        m += [(Keys.Rope.SCALING_TYPE.format(arch=a), "linear", V.STRING),
              (Keys.Rope.SCALING_FACTOR.format(arch=a), float(rs["factor"]), V.FLOAT32)]
    elif kind not in (None, "default") and kind not in hp.spec.rope_types:
        raise ConversionError(f"rope scaling {kind!r} is not supported")
    return m


def _tn(kind: MODEL_TENSOR, bid: int | None = None, suffix: str = ".weight") -> str:
    name = TENSOR_NAMES[kind]
    return (name.format(bid=bid) if bid is not None else name) + suffix


_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq$|^(model\.)?(vision_tower|multi_modal_projector|vision_model)\.)")
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass
class TensorPlan:
    """One output tensor: GGUF name, numpy-order shape, and how to produce its float32 values."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray] = field(repr=False)
    source: str = ""

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


def _map_name(hf_name: str, spec: HFSpec) -> str | None:
    """GGUF name for an HF tensor name; None for tensors llama.cpp drops; KeyError for unknown ones."""
    if _IGNORED.search(hf_name):
        return None
    if hf_name in ("lm_head.weight", "language_model.lm_head.weight"):
        return _tn(MODEL_TENSOR.OUTPUT)
    name = hf_name
    for p in _PREFIXES:
        if name.startswith(p):
            name = name[len(p):]
            break
    if name == "embed_tokens.weight":
        return _tn(MODEL_TENSOR.TOKEN_EMBD)
    if name == "norm.weight":
        return _tn(MODEL_TENSOR.OUTPUT_NORM)
    m = _LAYER_RE.match(name)
    if m:
        bid, key, suffix = int(m.group(1)), m.group(2), "." + m.group(3)
        short = spec.layer_tensors.get(key)
        if short is not None:
            return f"blk.{bid}.{short}{suffix}"
        stacked = spec.stacked_tensor(key)
        if stacked is not None:  # one slice of a stacked tensor (MoE experts): "name#index"
            return f"blk.{bid}.{stacked[0]}{suffix}#{stacked[1]}"
    raise KeyError(hf_name)


def expected_shapes(hp: Hparams, n_vocab_rows: int) -> dict[str, tuple[int, ...]]:
    """Every tensor the runtime needs, with its numpy-order shape (n_out, n_in)."""
    d = hp.n_embd
    out = {_tn(MODEL_TENSOR.TOKEN_EMBD): (n_vocab_rows, d), _tn(MODEL_TENSOR.OUTPUT_NORM): (d,)}
    if not hp.tied:
        out[_tn(MODEL_TENSOR.OUTPUT)] = (n_vocab_rows, d)
    layer = hp.spec.layer_shapes(hp)
    for i in range(hp.n_layer):
        out.update({f"blk.{i}.{name}": shape for name, shape in layer.items()})
    return out


def _block_order(name: str) -> tuple:
    """llama.cpp's file order: token_embd, then blk.0.*, blk.1.*, ..., then output_norm/output."""
    m = re.match(r"blk\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    return (0 if name.startswith(("token_embd", "rope_freqs")) else 2, 0, name)


def plan_tensors(ckpt: HFCheckpoint, hp: Hparams, n_tokens: int) -> list[TensorPlan]:
    """Map, check and order the checkpoint's tensors; nothing is loaded yet."""
    mapped: dict[str, str] = {}
    for hf_name in ckpt.tensors:
        try:
            name = _map_name(hf_name, hp.spec)
        except KeyError:
            raise ConversionError(f"{ckpt.path}: unexpected tensor {hf_name} for {hp.hf_arch}") from None
        if name is None or (hp.tied and name == _tn(MODEL_TENSOR.OUTPUT)):
            continue  # tied classifier: llama.cpp reads token_embd
        mapped[name] = hf_name
    stacks = _stacks(mapped)

    emb = _tn(MODEL_TENSOR.TOKEN_EMBD)
    if emb not in mapped:
        raise ConversionError(f"{ckpt.path}: tensor model.embed_tokens.weight is missing")
    emb_rows = ckpt.tensors[mapped[emb]].shape[0]
    n_rows = emb_rows
    if emb_rows > n_tokens and hp.spec.trim_embedding_to_vocab:
        n_rows = n_tokens  # llama.cpp drops Gemma 3's out-of-vocabulary embedding rows
    elif emb_rows < n_tokens:
        raise ConversionError(f"{ckpt.path}: the tokenizer has {n_tokens} tokens "
                              f"but the embedding only {emb_rows} rows")

    want = expected_shapes(hp, n_rows)
    missing = [n for n in want if n not in mapped and n not in stacks]
    if missing:
        raise ConversionError(f"{ckpt.path}: missing tensors: {', '.join(missing[:4])}"
                              + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""))
    extra = [mapped[n] for n in mapped if n not in want] + [p[min(p)] for n, p in stacks.items() if n not in want]
    if extra:
        names = ", ".join(extra[:4])
        raise ConversionError(f"{ckpt.path}: unexpected tensors for {hp.hf_arch}: {names}")
    for name, parts in stacks.items():
        if len(parts) != want[name][0] or set(parts) != set(range(len(parts))):
            raise ConversionError(f"{ckpt.path}: {name} needs slices 0..{want[name][0] - 1}, "
                                  f"the checkpoint has {len(parts)}")
    for name, hf_name in mapped.items():
        got = ckpt.tensors[hf_name].shape
        expect = want[name]
        if name == emb:
            expect = (emb_rows, hp.n_embd)
        if tuple(got) != tuple(expect):
            raise ConversionError(f"{ckpt.path}: tensor {hf_name} has shape {tuple(got)}, expected {tuple(expect)}")
    for name, parts in stacks.items():
        for hf_name in parts.values():
            if tuple(ckpt.tensors[hf_name].shape) != tuple(want[name][1:]):
                raise ConversionError(f"{ckpt.path}: tensor {hf_name} has shape "
                                      f"{tuple(ckpt.tensors[hf_name].shape)}, expected {tuple(want[name][1:])}")

    plans = []
    for name, hf_name in mapped.items():
        plans.append(TensorPlan(name, want[name], _loader(ckpt, hf_name, name, hp, n_rows), hf_name))
    for name, parts in stacks.items():
        names = [parts[i] for i in range(len(parts))]
        plans.append(TensorPlan(name, want[name], _stack_loader(ckpt, names, name, hp), names[0]))
    for name, values in hp.spec.extra_tensors(hp).items():
        plans.append(TensorPlan(name, values.shape, lambda v=values: v, "config.json"))
    plans.sort(key=lambda p: _block_order(p.name))
    return plans


def _stacks(mapped: dict[str, str]) -> dict[str, dict[int, str]]:
    """Take the slices ("name#index") out of `mapped`: name → {index: HF name}."""
    stacks: dict[str, dict[int, str]] = {}
    for key in [k for k in mapped if "#" in k]:
        name, index = key.rsplit("#", 1)
        stacks.setdefault(name, {})[int(index)] = mapped.pop(key)
    return stacks


def _stack_loader(ckpt: HFCheckpoint, hf_names: list[str], name: str, hp: Hparams) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        return np.ascontiguousarray(np.stack([hp.spec.transform(name, ckpt.load(n), hp) for n in hf_names]),
                                    dtype=np.float32)
    return load


def _loader(ckpt: HFCheckpoint, hf_name: str, name: str, hp: Hparams, n_rows: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        x = hp.spec.transform(name, ckpt.load(hf_name), hp)
        if name == "token_embd.weight" and x.shape[0] != n_rows:
            x = x[:n_rows]
        return np.ascontiguousarray(x, dtype=np.float32)
    return load


# ------------------------------------------------------------------------------------------------
# Vocabulary
# ------------------------------------------------------------------------------------------------

# the text llama.cpp tokenizes to fingerprint a BPE pre-tokenizer (convert_hf_to_gguf.py, get_vocab_base_pre)
CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
              '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
              '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
              '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')

# sha256(str(token ids of CHECK_TEXT)) → tokenizer.ggml.pre, for the model families edgeq knows
KNOWN_PRE_HASHES = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}

# pre-tokenizer split regexes as they appear in tokenizer.json → llama.cpp's name (fallback when the hash is unknown)
_QWEN2_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


@dataclass
class Vocab:
    model: str                          # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None   # SPM only
    merges: list[str] | None = None     # BPE only
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad → id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def metadata(self) -> list[tuple[str, Any, GGUFValueType]]:
        T = Keys.Tokenizer
        m = [(T.MODEL, self.model, V.STRING), (T.PRE, self.pre, V.STRING),
             (T.LIST, self.tokens, V.ARRAY, V.STRING)]
        if self.scores is not None:
            m.append((T.SCORES, self.scores, V.ARRAY, V.FLOAT32))
        m.append((T.TOKEN_TYPE, self.token_types, V.ARRAY, V.INT32))
        if self.merges is not None:
            m.append((T.MERGES, self.merges, V.ARRAY, V.STRING))
        keys = {"bos": T.BOS_ID, "eos": T.EOS_ID, "unk": T.UNK_ID, "pad": T.PAD_ID}
        for typ, key in keys.items():
            if typ in self.special:
                m.append((key, self.special[typ], V.UINT32))
        m += [(T.ADD_BOS, self.add_bos, V.BOOL), (T.ADD_EOS, self.add_eos, V.BOOL)]
        if self.add_space_prefix is not None:
            m.append((T.ADD_PREFIX, self.add_space_prefix, V.BOOL))
        if self.chat_template:
            m.append((T.CHAT_TEMPLATE, self.chat_template, V.STRING))
        return m


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("[") and token.endswith("]") and token[1:-1].isupper()))


def _merge_text(m) -> str:
    return " ".join(m) if isinstance(m, list) else m


def bpe_pre_name(tokenizer_json: dict[str, Any]) -> str:
    """tokenizer.ggml.pre: llama.cpp's fingerprint hash first, then the pre_tokenizer's structure."""
    from tokenizers import Tokenizer

    try:
        ids = Tokenizer.from_str(json.dumps(tokenizer_json)).encode(CHECK_TEXT).ids
        name = KNOWN_PRE_HASHES.get(hashlib.sha256(str(ids).encode()).hexdigest())
        if name:
            return name
    except Exception as e:  # a tokenizer the installed `tokenizers` cannot load: fall back to structure
        log.debug("could not fingerprint the tokenizer: %s", e)
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    types = [p.get("type") for p in parts]
    if _QWEN2_RE in regexes:
        return "qwen2"
    if _LLAMA3_RE in regexes:
        return "llama-bpe"
    if "Digits" in types and any(p.get("individual_digits") for p in parts):
        return "smollm"
    if types == ["ByteLevel"] and pre.get("use_regex", True):
        return "gpt-2"
    log.warning("unrecognized BPE pre-tokenizer: writing tokenizer.ggml.pre = 'default'")
    return "default"


def _token_id(ckpt: HFCheckpoint, token: Any, vocab: dict[str, int]) -> int | None:
    if isinstance(token, dict):
        token = token.get("content")
    return vocab.get(token) if isinstance(token, str) else None


def _special_and_flags(ckpt: HFCheckpoint, vocab: dict[str, int], n: int, v: Vocab) -> None:
    """bos/eos/unk/pad ids and add_bos/add_eos the way gguf-py's SpecialVocab finds them."""
    tc, cfg = ckpt.tokenizer_config, _text_config(ckpt.config)
    for typ in ("bos", "eos", "unk", "pad"):
        tid = _token_id(ckpt, tc.get(f"{typ}_token") or ckpt.special_tokens_map.get(f"{typ}_token"), vocab)
        if tid is None:
            cid = cfg.get(f"{typ}_token_id", ckpt.config.get(f"{typ}_token_id"))
            if isinstance(cid, list):
                cid = cid[0] if cid else None
            tid = cid if isinstance(cid, int) else None
        if tid is not None and 0 <= tid < n:
            v.special[typ] = int(tid)
    post = (ckpt.tokenizer_json or {}).get("post_processor") or {}
    single = post.get("single") if post.get("type") == "TemplateProcessing" else None
    if isinstance(single, list) and single:
        first, last = single[0].get("SpecialToken"), single[-1].get("SpecialToken")
        v.add_bos = bool(first) and vocab.get(first["id"]) == v.special.get("bos")
        v.add_eos = bool(last) and vocab.get(last["id"]) == v.special.get("eos")
    elif ckpt.sentencepiece_model is not None and ckpt.tokenizer_json is None:
        v.add_bos = True  # SentencePiece's (and llama.cpp's) default
    if "add_bos_token" in tc:
        v.add_bos = bool(tc["add_bos_token"])
    if "add_eos_token" in tc:
        v.add_eos = bool(tc["add_eos_token"])
    v.chat_template = ckpt.chat_template


def _added_tokens(ckpt: HFCheckpoint) -> dict[int, dict[str, Any]]:
    """id → {content, special} from tokenizer.json and tokenizer_config.json's added_tokens_decoder."""
    out: dict[int, dict[str, Any]] = {}
    for t in (ckpt.tokenizer_json or {}).get("added_tokens") or []:
        out[int(t["id"])] = {"content": t["content"], "special": bool(t.get("special"))}
    for k, t in (ckpt.tokenizer_config.get("added_tokens_decoder") or {}).items():
        out.setdefault(int(k), {"content": t["content"], "special": bool(t.get("special"))})
    return out


def read_vocab(ckpt: HFCheckpoint, hp: Hparams, emb_rows: int) -> Vocab:
    """The tokenizer in llama.cpp's terms; `emb_rows` pads a short vocabulary with [PAD{i}] tokens."""
    tj = ckpt.tokenizer_json
    model = (tj or {}).get("model") or {}
    if tj is not None and model.get("type") == "BPE" and not model.get("byte_fallback"):
        return _bpe_vocab(ckpt, emb_rows)
    if tj is not None and model.get("type") in ("BPE", "Unigram"):
        return _spm_vocab_from_json(ckpt, hp, emb_rows)
    if ckpt.sentencepiece_model is not None:
        return _spm_vocab_from_model(ckpt, hp, emb_rows)
    raise ConversionError(f"{ckpt.path}: unsupported tokenizer model {model.get('type')!r} in tokenizer.json")


def _pad(tokens: list[str | None], n: int) -> list[str | None]:
    return tokens + [None] * (n - len(tokens)) if len(tokens) < n else tokens


def _bpe_vocab(ckpt: HFCheckpoint, emb_rows: int) -> Vocab:
    tj = ckpt.tokenizer_json
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    added = _added_tokens(ckpt)
    for i, t in added.items():
        vocab.setdefault(t["content"], i)
    n = max(emb_rows, max(vocab.values()) + 1)
    by_id: list[str | None] = [None] * n
    for tok, i in vocab.items():
        by_id[i] = tok
    tokens, types = [], []
    for i, tok in enumerate(by_id):
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        elif i in added:
            special = added[i]["special"] or _looks_special(tok)
            tokens.append(tok if special else tok.replace("\u2581", " "))
            types.append(int(TokenType.CONTROL if special else TokenType.USER_DEFINED))
        else:
            tokens.append(tok)
            types.append(int(TokenType.NORMAL))
    v = Vocab("gpt2", bpe_pre_name(tj), tokens, types,
              merges=[_merge_text(m) for m in tj["model"].get("merges", [])])
    _special_and_flags(ckpt, vocab, n, v)
    return v


def _spm_vocab_from_json(ckpt: HFCheckpoint, hp: Hparams, emb_rows: int) -> Vocab:
    """A SentencePiece vocabulary stored as tokenizer.json (byte-fallback BPE or Unigram).

    BPE pieces get score -id (SentencePiece numbers BPE pieces in merge order, and llama.cpp's SPM
    tokenizer merges the best-scoring pair first); Unigram pieces keep their log-probabilities.
    """
    tj = ckpt.tokenizer_json
    model = tj["model"]
    if model["type"] == "Unigram":
        pieces = [(p, float(s)) for p, s in model["vocab"]]
        vocab = {p: i for i, (p, _) in enumerate(pieces)}
    else:
        vocab = dict(model["vocab"])
        pieces = [None] * (max(vocab.values()) + 1)
        for p, i in vocab.items():
            pieces[i] = (p, -float(i))
    added = _added_tokens(ckpt)
    n = max(len(pieces), max(added, default=-1) + 1)
    if not hp.spec.trim_embedding_to_vocab:
        n = max(n, emb_rows)
    unk = model.get("unk_token") if model["type"] == "BPE" else None
    unk_id = vocab.get(unk) if unk else model.get("unk_id")
    tokens, scores, types = [], [], []
    for i in range(n):
        p = pieces[i] if i < len(pieces) else None
        if p is None:
            tokens.append(f"[PAD{i}]"), scores.append(-1000.0), types.append(int(TokenType.UNUSED))
            continue
        text, score = p
        kind = TokenType.NORMAL
        if i == unk_id:
            kind = TokenType.UNKNOWN
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            kind, score = TokenType.BYTE, 0.0
        tokens.append(text), scores.append(score), types.append(int(kind))
    for i, t in added.items():
        if i >= n:
            continue
        special = t["special"] or _looks_special(t["content"])
        tokens[i] = t["content"] if special else t["content"].replace("\u2581", " ")
        types[i] = int(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        scores[i] = -1000.0
    for i, t in added.items():
        vocab.setdefault(t["content"], i)
    v = Vocab("llama", "default", tokens, types, scores=scores)
    normalizer = json.dumps(tj.get("normalizer") or {})
    v.add_space_prefix = '"Prepend"' in normalizer and hp.spec.spm_add_space_prefix is not False
    _special_and_flags(ckpt, vocab, n, v)
    return v


def _spm_vocab_from_model(ckpt: HFCheckpoint, hp: Hparams, emb_rows: int) -> Vocab:
    """tokenizer.model via sentencepiece: convert_hf_to_gguf.py's _create_vocab_sentencepiece."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(ckpt.sentencepiece_model))
    except Exception as e:
        raise ConversionError(f"{ckpt.sentencepiece_model}: not a SentencePiece model ({e})") from None
    n = max(sp.vocab_size(), 0 if hp.spec.trim_embedding_to_vocab else emb_rows)
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = [-1000.0] * n
    types = [int(TokenType.UNUSED)] * n
    for i in range(sp.vocab_size()):
        kind = TokenType.NORMAL
        if sp.IsUnknown(i):
            kind = TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = TokenType.UNUSED
        elif sp.IsByte(i):
            kind = TokenType.BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i), sp.GetScore(i), int(kind)
    for content, i in (ckpt.added_tokens or {}).items():
        if i < n:
            tokens[i], scores[i], types[i] = content, -1000.0, int(TokenType.USER_DEFINED)
    for i, t in _added_tokens(ckpt).items():
        if i < n:
            special = t["special"] or _looks_special(t["content"])
            tokens[i] = t["content"] if special else t["content"].replace("\u2581", " ")
            types[i] = int(TokenType.CONTROL if special else TokenType.USER_DEFINED)
            scores[i] = -1000.0
    vocab = {t: i for i, t in enumerate(tokens)}
    v = Vocab("llama", "default", tokens, types, scores=scores)
    v.add_space_prefix = hp.spec.spm_add_space_prefix
    _special_and_flags(ckpt, vocab, n, v)
    return v


# ------------------------------------------------------------------------------------------------
# The whole conversion
# ------------------------------------------------------------------------------------------------

@dataclass
class Conversion:
    hparams: Hparams
    vocab: Vocab
    tensors: list[TensorPlan]
    general: list[tuple[str, Any, GGUFValueType]]

    @property
    def arch(self) -> str:
        return self.hparams.arch

    def metadata(self, file_type: int) -> list[tuple[str, Any, GGUFValueType, GGUFValueType | None]]:
        """(key, value, type, array item type): everything but general.architecture (the writer adds
        it), in llama.cpp's order."""
        G = Keys.General
        entries = (self.general + metadata(self.hparams)
                   + [(G.FILE_TYPE, int(file_type), V.UINT32)]
                   + self.vocab.metadata()
                   + [(G.QUANTIZATION_VERSION, GGML_QUANT_VERSION, V.UINT32)])
        return [e if len(e) == 4 else (*e, None) for e in entries]


def _general(ckpt: HFCheckpoint, n_params: int) -> list[tuple[str, Any, GGUFValueType]]:
    G = Keys.General
    name = ckpt.config.get("_name_or_path") or ckpt.config.get("_model_name_or_path") or ckpt.path.name
    name = str(name).rstrip("/").split("/")[-1] or ckpt.path.name
    from gguf.utility import size_label

    return [(G.TYPE, "model", V.STRING), (G.NAME, name, V.STRING),
            (G.SIZE_LABEL, size_label(n_params, 0, 0, 0), V.STRING)]


def plan(ckpt: HFCheckpoint) -> Conversion:
    """Read and check everything about the conversion; raises ConversionError before anything is written."""
    hp = read_hparams(ckpt)
    emb_name = next((k for k in ckpt.tensors if _map_name_safe(k, hp.spec) == "token_embd.weight"), None)
    if emb_name is None:
        raise ConversionError(f"{ckpt.path}: tensor model.embed_tokens.weight is missing")
    emb_rows = ckpt.tensors[emb_name].shape[0]
    vocab = read_vocab(ckpt, hp, emb_rows)
    tensors = plan_tensors(ckpt, hp, len(vocab.tokens))
    n_vocab_rows = next(t.shape[0] for t in tensors if t.name == "token_embd.weight")
    if len(vocab.tokens) != n_vocab_rows:
        raise ConversionError(f"{ckpt.path}: {len(vocab.tokens)} tokens for {n_vocab_rows} embedding rows")
    hp.n_vocab = n_vocab_rows
    n_params = sum(t.n_elements for t in tensors)
    return Conversion(hp, vocab, tensors, _general(ckpt, n_params))


def _map_name_safe(hf_name: str, spec: HFSpec) -> str | None:
    try:
        return _map_name(hf_name, spec)
    except KeyError:
        return None
