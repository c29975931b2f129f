"""Making variants: GGUF quantization with llama.cpp (and importance matrices), transformers
recipes (bitsandbytes, AWQ/GPTQ with llm-compressor), and the request a backend's prepare
function receives.
"""
