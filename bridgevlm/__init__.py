"""bridgevlm: vision-language models from a frozen vision encoder, a frozen LLM and a small trained bridge."""
__version__ = "0.1.0"
