"""Serving compressed folders: the vLLM plugin (vllm_plugin.py, the only module that imports vLLM) and its vLLM-free
part, names and forward (vllm_layout.py)."""
