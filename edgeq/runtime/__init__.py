"""The runtime: a loaded model (engine), its KV cache, tokenizer, chat template, sampling, perplexity."""
