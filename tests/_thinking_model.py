"""A tiny Qwen3 GGUF that thinks on cue, with Qwen3's real chat template (tests/data/qwen3_chat_template.jinja,
as Qwen/Qwen3-0.6B ships it; llama.cpp keeps the same text in models/templates/Qwen-Qwen3-0.6B.jinja).

The weights make greedy decoding a fixed chain: the attention and feed-forward outputs are zero, so the
residual stream is the token's one-hot embedding, and the classifier maps each token to the next one of
SCRIPT. After the generation prompt's "\\n" the model writes "<think>hm</think>OK<|im_end|>": a real forward
pass (RMSNorm, q/k norms, RoPE, attention, the KV cache) that produces a known reply.
"""
from pathlib import Path

import numpy as np

TEMPLATE = (Path(__file__).parent / "data" / "qwen3_chat_template.jinja").read_text(encoding="utf-8")
IM_START, IM_END, THINK, END_THINK = 128, 129, 130, 131
VOCAB = 132  # bytes 0..127, then the four special tokens
SCRIPT = [ord("\n"), THINK, ord("h"), ord("m"), END_THINK, ord("O"), ord("K"), IM_END]
REASONING, CONTENT = "hm", "OK"


def thinking_qwen3_gguf(path) -> Path:
    import gguf

    from edgeq.formats.quants import quantize
    from edgeq.runtime.tokenizer import BYTE_TO_CHAR

    n_embd, n_ff, n_head, n_kv, hd = 160, 32, 2, 1, 32
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "qwen3")
    for k, v in [("embedding_length", n_embd), ("block_count", 1), ("feed_forward_length", n_ff),
                 ("attention.head_count", n_head), ("attention.head_count_kv", n_kv), ("context_length", 512),
                 ("attention.key_length", hd), ("attention.value_length", hd)]:
        w.add_uint32(f"qwen3.{k}", v)
    w.add_float32("qwen3.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32("qwen3.rope.freq_base", 10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([BYTE_TO_CHAR[b] for b in range(128)] + ["<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    w.add_token_types([1] * 128 + [3, 3, 4, 4])  # control, control, user-defined, user-defined (as Qwen3's file)
    w.add_eos_token_id(IM_END)
    w.add_chat_template(TEMPLATE)

    def add(name, x):
        w.add_tensor(name, quantize(x.astype(np.float32), "Q8_0"), raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    add("token_embd.weight", np.eye(VOCAB, n_embd))
    p = "blk.0."
    w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, np.float32))
    add(p + "attn_q.weight", rng.standard_normal((n_head * hd, n_embd)) * 0.1)
    add(p + "attn_k.weight", rng.standard_normal((n_kv * hd, n_embd)) * 0.1)
    add(p + "attn_v.weight", rng.standard_normal((n_kv * hd, n_embd)) * 0.1)
    w.add_tensor(p + "attn_q_norm.weight", np.ones(hd, np.float32))
    w.add_tensor(p + "attn_k_norm.weight", np.ones(hd, np.float32))
    add(p + "attn_output.weight", np.zeros((n_embd, n_head * hd)))
    w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, np.float32))
    add(p + "ffn_gate.weight", rng.standard_normal((n_ff, n_embd)) * 0.1)
    add(p + "ffn_up.weight", rng.standard_normal((n_ff, n_embd)) * 0.1)
    add(p + "ffn_down.weight", np.zeros((n_embd, n_ff)))
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    out = np.zeros((VOCAB, n_embd))
    out[IM_END, :VOCAB] = 10.0  # every token not in the script ends the turn
    for a, b in zip(SCRIPT, SCRIPT[1:]):
        out[:, a] = 0.0
        out[b, a] = 10.0
    add("output.weight", out)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
