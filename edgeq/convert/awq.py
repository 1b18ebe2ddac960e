"""AWQ-style scaling folded into the graph (Lin et al. 2023): per input channel j, the matrices that read an
activation get their column j multiplied by s_j and the tensor that produced the activation gets its
output j divided by s_j, so the float network computes the same function while the quantizer sees
salient channels (large |x|) at a larger scale, where a grid step costs them relatively less.

Which producer feeds which readers is a per-architecture fact (FOLDS): a pre-norm's weight (an RMSNorm
multiplies elementwise: w/s is exact) feeds q/k/v or gate/up; v's rows feed attention_output's columns
(attention mixes whole v rows, so a per-row scale passes through; with GQA each kv head's rows feed the
columns of the q heads that share it); up's rows feed down (act(gate)·up is linear in up). The file keeps
its architecture and tensor set: llama.cpp and edgeq read it as any other.

s = rms(x)^α normalised to a geometric mean scale of 1 (AWQ uses mean|x|; the calibration keeps mean x²,
which orders channels the same way), α chosen per group by the readers' output error after quantization,
measured on held-out windows: tr((W·s − Q) Hs (W·s − Q)ᵀ) with Hs = H / (s sᵀ) the Hessian of the
scaled input x/s. The grid is searched with the fast importance-search quantizer (GPTQ at 11 points
costs 5× more: 17 CPU-s per SmolLM2 layer), then the chosen method (GPTQ) decides between that α and
α = 0 (no scaling): the fold is kept only where it lowers GPTQ's held-out error by MIN_GAIN or more, so a
group is never made worse on the windows that judge it. Where the grid itself gained less than DECIDE_GAIN,
α = 0 is kept without asking GPTQ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from edgeq.convert.gptq import output_error, strided_rows
from edgeq.errors import EdgeqError

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)   # the grid, then REFINE either side of its best: 7 points at 0.125 apart
REFINE = 0.125                         # (AWQ searches 20 points; 11 evenly spaced cost 1.6x these 7)
# the grid judges each α on at most this many rows of each reader (evenly strided, the same rows for every α):
# a scale is per input channel, shared by every row, and each row's error is independent given H, so a row
# sample estimates the summed error. Whole matrices made Qwen3-1.7B's quantizing ~160 s per layer, GPTQ ~20 of it
# (12288 gate/up rows quantized and float64 (rows x 6144) @ (6144 x 6144) products, 11 times over); 1024 rows
# still ~25 s of a layer's ~55 (11 x 6 readers x 1024 rows importance-searched, and their error products); 512
# rows were ~17% of the 1.7B calibration's time after the other speed-ups, which 256 halves
SEARCH_ROWS = 256
MIN_GAIN = 0.05  # a fold is kept only if it lowers the method's held-out error by this fraction: smaller gains
                 # on 8 held-out windows did not carry over on SmolLM2 (Q2_K PPL +0.4 with every gain kept);
                 # on Gemma 3 they did (docs/quality.md): not settled, this is the conservative side
DECIDE_GAIN = 2 * MIN_GAIN  # the method judges an α only where the grid's fast quantizer gained this much by it:
                 # GPTQ gains less from a fold than the importance search does (it compensates the error itself);
                 # on SmolLM2 Q2_K every fold GPTQ kept had a grid gain >= 0.116, and the 39 of 95 groups below 0.10
                 # all gained GPTQ < 0.03. A random-weight Qwen3-1.7B's grid gains are ~0.01-0.03: no GPTQ run there
MIN_RMS = 1e-5   # channels below this fraction of the largest rms are treated as this small (no 1/0 in the fold)

# arch → (kinds of fold it allows); what the others lack, said once
_STANDARD = ("norm", "v_o", "up_down")
FOLDS: dict[str, tuple[str, ...]] = {a: _STANDARD for a in ("llama", "qwen2", "qwen3", "smollm3", "granite", "gemma3")}
REFUSED: dict[str, str] = {
    "phi3": "q/k/v and gate/up are fused matrices (attn_qkv, ffn_up of 2·n_ff rows): no per-matrix fold",
    "qwen3moe": "ffn_norm feeds a router and stacked expert tensors, not one set of matrices",
}


class AwqError(EdgeqError):
    """AWQ scaling asked of a model it cannot be folded into."""


@dataclass
class Group:
    """One fold: `producer`'s outputs (a norm's vector, or a matrix's rows, with its bias if any) are divided by
    s, the columns of `readers` multiplied by s[col_index] (col_index: a reader column → its producer output)."""

    producer: str
    readers: tuple[str, ...]
    producer_bias: str | None = None
    col_index: np.ndarray | None = None   # None: identity (as many columns as producer outputs)


def check_arch(arch: str) -> None:
    if arch in FOLDS:
        return
    why = REFUSED.get(arch, "no fold rule is known for this architecture")
    raise AwqError(f"AWQ scaling cannot be folded into {arch}: {why}")


def groups(arch: str, shapes: dict[str, tuple[int, ...]], n_head: int, n_head_kv: int) -> list[Group]:
    """The folds of a model whose tensors have these (numpy-order) shapes; a layer lacking a tensor of a
    group (or with unexpected shapes) just has no such group."""
    check_arch(arch)
    out: list[Group] = []
    n_layer = 1 + max((int(n.split(".")[1]) for n in shapes if n.startswith("blk.")), default=-1)
    for i in range(n_layer):
        p = f"blk.{i}."

        def has(*names):
            return all(p + n + ".weight" in shapes for n in names)

        if has("attn_norm", "attn_q", "attn_k", "attn_v"):
            out.append(Group(p + "attn_norm.weight", tuple(p + n + ".weight" for n in ("attn_q", "attn_k", "attn_v"))))
        if has("ffn_norm", "ffn_gate", "ffn_up") and len(shapes[p + "ffn_gate.weight"]) == 2:
            out.append(Group(p + "ffn_norm.weight", (p + "ffn_gate.weight", p + "ffn_up.weight")))
        if has("attn_v", "attn_output"):
            v_rows, o_cols = shapes[p + "attn_v.weight"][0], shapes[p + "attn_output.weight"][1]
            head_dim = v_rows // n_head_kv
            if v_rows == n_head_kv * head_dim and o_cols == n_head * head_dim and n_head % n_head_kv == 0:
                col = np.arange(o_cols)
                index = (col // head_dim) // (n_head // n_head_kv) * head_dim + col % head_dim
                bias = p + "attn_v.bias" if p + "attn_v.bias" in shapes else None
                out.append(Group(p + "attn_v.weight", (p + "attn_output.weight",), bias, index))
        if has("ffn_up", "ffn_down") and len(shapes[p + "ffn_up.weight"]) == 2:
            if shapes[p + "ffn_up.weight"][0] == shapes[p + "ffn_down.weight"][1]:
                bias = p + "ffn_up.bias" if p + "ffn_up.bias" in shapes else None
                out.append(Group(p + "ffn_up.weight", (p + "ffn_down.weight",), bias))
    return out


def scales(rms: np.ndarray, alpha: float) -> np.ndarray:
    """s = rms^α over the producer's outputs, divided by its geometric mean (AWQ normalises by √(max·min);
    the geometric mean keeps the weights' overall size, so fp16 block scales stay in range)."""
    r = np.maximum(np.asarray(rms, np.float64), MIN_RMS * max(float(np.max(rms)), 1e-30))
    s = r ** alpha
    return s / np.exp(np.mean(np.log(s)))


def scaled_hessian(H: np.ndarray, s_cols: np.ndarray) -> np.ndarray:
    """Hessian of the input x/s, given that of x."""
    return H / np.outer(s_cols, s_cols)


# quantize(W, H_fit, importance) → the dequantized float matrix the chosen method makes of W
Quantizer = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def search(readers: Sequence[np.ndarray], rms: np.ndarray, H_fit: np.ndarray, n_fit: int, H_judge: np.ndarray,
           quantizers: Sequence[Quantizer], col_index: np.ndarray | None = None,
           alphas: Sequence[float] = ALPHAS, refine: float = REFINE,
           hessian: bool = True) -> tuple[np.ndarray, float, list[float]]:
    """AWQ grid search for one group: (s over the producer's outputs, the α chosen, the error per α tried).

    readers: the matrices reading the activation (rows, n_in), each with its quantizer; rms: per producer
    output, the activation's rms; H_fit / H_judge: the readers' input Hessian on the fitting / judging
    windows (one Hessian: the readers share their input); n_fit: tokens behind H_fit. The error of an α is
    the readers' summed output error, each relative to its ‖W Xᵀ‖² on the judging windows, over at most
    SEARCH_ROWS rows of each (evenly strided). After `alphas`, the points `refine` either side of the best are
    tried too (errors: in the order tried, `alphas` first). hessian=False: the quantizers read only the
    importance (the scaled H_fit is not built for them)."""
    readers = [W[strided_rows(W.shape[0], SEARCH_ROWS)] for W in readers]
    H32 = np.asarray(H_judge, np.float32)   # float32: the search's cost (errors only rank the α)
    ref = [max(output_error(W, np.zeros_like(W), H32), 1e-30) for W in readers]
    diag = np.diagonal(H_fit) / max(n_fit, 1)
    tried: list[float] = []
    errors: list[float] = []

    def error_of(alpha: float) -> float:
        s_cols = scales(rms, alpha)
        s_cols = s_cols if col_index is None else s_cols[col_index]
        Hf = scaled_hessian(H_fit, s_cols) if hessian else None
        imp = (diag / s_cols ** 2).astype(np.float32)
        err = 0.0
        for W, quantize, r in zip(readers, quantizers, ref):
            Ws = (np.asarray(W, np.float64) * s_cols).astype(np.float32)
            # tr((Ws − Q) Hs (Ws − Q)ᵀ) with Hs = H / (s sᵀ) is W's error against Q / s under H itself
            err += output_error(W, (quantize(Ws, Hf, imp) / s_cols).astype(np.float32), H32) / r
        tried.append(float(alpha))
        errors.append(err)
        return err

    for alpha in alphas:
        error_of(alpha)
    if refine > 0:
        best = tried[int(np.argmin(errors))]
        for alpha in (best - refine, best + refine):
            if 0.0 < alpha < 1.0 and not any(abs(alpha - a) < 1e-9 for a in tried):
                error_of(alpha)
    # strict: ties keep the earliest α tried (0 first: no scaling unless it helps)
    best = tried[int(np.argmin(errors))]
    return scales(rms, best), best, errors


def fold(producer: np.ndarray, readers: Sequence[np.ndarray], s: np.ndarray, col_index: np.ndarray | None = None,
         producer_bias: np.ndarray | None = None):
    """(producer / s, [reader · s], bias / s): a 1-D producer (a norm's weight) elementwise, a matrix by rows."""
    s = np.asarray(s, np.float64)
    s_cols = s if col_index is None else s[col_index]
    p = np.asarray(producer, np.float64)
    p = p / s if p.ndim == 1 else p / s[:, None]
    folded = [(np.asarray(W, np.float64) * s_cols).astype(np.float32) for W in readers]
    bias = None if producer_bias is None else (np.asarray(producer_bias, np.float64) / s).astype(np.float32)
    return p.astype(np.float32), folded, bias


def rms_of(H: np.ndarray, n_tokens: int, col_index: np.ndarray | None, n_out: int) -> np.ndarray:
    """Per producer output: the rms of the readers' input (with a col_index, over the columns it feeds)."""
    ms = np.diagonal(H) / max(n_tokens, 1)
    if col_index is not None:
        ms = np.bincount(col_index, weights=ms, minlength=n_out) / np.maximum(np.bincount(col_index, minlength=n_out), 1)
    return np.sqrt(np.maximum(ms, 0.0))


class ScaledHessians:
    """The calibration Hessians (gptq.Hessians) as seen by folded matrices: H / (s sᵀ) for a matrix whose
    columns were multiplied by s (its input divided by s); every other matrix as collected."""

    def __init__(self, hs, col_scale: dict[str, np.ndarray]):
        self.hs, self.col_scale = hs, col_scale
        self.key_of, self.tokens = hs.key_of, hs.tokens
        self._factors: dict = {}

    def get(self, name: str, which: str = "all"):
        H = self.hs.get(name, which)
        s = self.col_scale.get(name)
        return H if H is None or s is None else scaled_hessian(H, s)

    def has_held_out(self, name: str) -> bool:
        return self.hs.has_held_out(name)

    def has(self, name: str) -> bool:
        return self.hs.has(name)

    def factor(self, name: str, which: str = "all"):
        """gptq's H⁻¹ factor of the scaled H, shared by the matrices that read one input with the same column
        scales (a group's readers); the collected H's shared one for a matrix not folded."""
        s = self.col_scale.get(name)
        if s is None:
            return self.hs.factor(name, which)
        key = (self.key_of[name], which, s.tobytes())   # q/k/v (gate/up) folded together share one
        if key not in self._factors:
            self._factors[key] = self.hs.factor_of(self.get(name, which))   # (often the search's own)
        return self._factors[key]


class Folding:
    """Folds a model's tensors as a writer asks for them: the first tensor of a layer that belongs to a group
    makes that layer's groups (search, then fold); each folded tensor is handed out once and dropped, so one
    layer's matrices are held at a time.

    loaders: name → float32 loader; types: name → the GGUF type it will be written as; hs: gptq.Hessians;
    quantizer_for(qtype) → the method's awq.Quantizer, coarse_for(qtype) → a fast one for the α grid
    (default: quantizer_for); cache: (producer, reader types) → s, shared by runs that quantize
    the same calibration again (e.g. to another method)."""

    def __init__(self, arch: str, loaders: dict[str, Callable[[], np.ndarray]], shapes: dict[str, tuple[int, ...]],
                 types: dict[str, str], hs, n_head: int, n_head_kv: int, quantizer_for: Callable[[str], Quantizer],
                 cache: dict | None = None, coarse_for: Callable[[str], Quantizer] | None = None):
        self.loaders, self.types, self.hs, self.quantizer_for = loaders, types, hs, quantizer_for
        self.coarse_for = coarse_for or quantizer_for
        self.min_gain = MIN_GAIN
        self.groups = [g for g in groups(arch, shapes, n_head, n_head_kv) if self._searchable(g)]
        self.layer_of = {}
        for g in self.groups:
            layer = g.producer.split(".")[1]
            for name in (g.producer, g.producer_bias, *g.readers):
                if name:
                    self.layer_of[name] = layer
        self.col_scale: dict[str, np.ndarray] = {}
        self.alphas: dict[str, float] = {}    # producer → α chosen
        self.cache = {} if cache is None else cache
        self._ready: dict[str, np.ndarray] = {}
        self.hessians = ScaledHessians(hs, self.col_scale)

    def _searchable(self, g: Group) -> bool:
        """A group is searched when its readers have a Hessian and a grid type (a float reader gains nothing)."""
        from edgeq.formats.quant_grid import GRID_TYPES

        return (self.hs.get(g.readers[0], "fit") is not None
                and any(self.types.get(r) in GRID_TYPES for r in g.readers))

    def load(self, name: str) -> np.ndarray:
        if name in self._ready:
            return self._ready.pop(name)
        layer = self.layer_of.get(name)
        if layer is None:
            return self.loaders[name]()
        self._fold_layer(layer)
        return self._ready.pop(name)

    def folded(self) -> list[str]:
        """Names of the tensors a scaled group (α > 0) changed so far."""
        return sorted({n for g in self.groups if self.alphas.get(g.producer, 0.0) > 0
                       for n in (g.producer, g.producer_bias, *g.readers) if n})

    def importance(self, name: str, imp: np.ndarray | None) -> np.ndarray | None:
        """Mean x² of a folded matrix's input x/s."""
        s = self.col_scale.get(name)
        return imp if imp is None or s is None else (imp / s ** 2).astype(np.float32)

    def _fold_layer(self, layer: str) -> None:
        gs = [g for g in self.groups if g.producer.split(".")[1] == layer]
        names = {n for g in gs for n in (g.producer, g.producer_bias, *g.readers) if n}
        cur = {n: np.asarray(self.loaders[n](), np.float32) for n in sorted(names)}
        found = []
        for g in gs:   # every search sees the layer as it was; the folds then commute (rows vs columns)
            found.append((g, self._scale(g, cur)))
        for g, s in found:
            p, readers, bias = fold(cur[g.producer], [cur[r] for r in g.readers], s, g.col_index,
                                    cur[g.producer_bias] if g.producer_bias else None)
            cur[g.producer] = p
            for r, W in zip(g.readers, readers):
                cur[r] = W
                s_cols = s if g.col_index is None else s[g.col_index]
                self.col_scale[r] = self.col_scale[r] * s_cols if r in self.col_scale else s_cols
            if bias is not None:
                cur[g.producer_bias] = bias
        self._ready.update(cur)

    def _scale(self, g: Group, cur: dict[str, np.ndarray]) -> np.ndarray:
        key = (g.producer, tuple(self.types.get(r) for r in g.readers))
        if key not in self.cache:
            hs, first = self.hs, g.readers[0]
            n_fit = hs.tokens[hs.key_of[first]][0]
            held = hs.has_held_out(first)
            H_fit = hs.get(first, "fit") if held else hs.get(first, "all")
            H_judge = hs.get(first, "held") if held else H_fit
            n = n_fit if held else sum(hs.tokens[hs.key_of[first]])
            n_out = cur[g.producer].shape[0]
            rms = rms_of(H_fit, n, g.col_index, n_out)
            readers = [cur[r] for r in g.readers]
            # the grid with the fast quantizer (the importance search), then the chosen method at that α
            # against α = 0: a fold is kept only where it lowers the method's own held-out error
            _, alpha, coarse = search(readers, rms, H_fit, n, H_judge,
                                      [self.coarse_for(self.types[r]) for r in g.readers], g.col_index,
                                      hessian=self.coarse_for is self.quantizer_for)
            if alpha > 0 and coarse[1:] and 1.0 - min(coarse) / max(coarse[0], 1e-300) < DECIDE_GAIN:
                alpha = 0.0   # (coarse[0] is α = 0's error) too small a gain for the method to keep
            if alpha > 0:
                _, _, (err_none, err_alpha) = search(readers, rms, H_fit, n, H_judge,
                                                     [self.quantizer_for(self.types[r]) for r in g.readers],
                                                     g.col_index, alphas=(0.0, alpha), refine=0.0)
                if err_alpha > (1.0 - self.min_gain) * err_none:
                    alpha = 0.0
            s = scales(rms, alpha)
            self.cache[key] = (s, alpha)
        s, alpha = self.cache[key]
        self.alphas[g.producer] = alpha
        return s
