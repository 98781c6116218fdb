"""bridgevlm: vision-language models from a frozen vision encoder, a frozen LLM and a small trained bridge."""
__version__ = "0.1.0"


def load(path, trust_remote_code: bool = False):
    """Load a bridgevlm model, a training run's final model, or a Hugging Face Llava directory."""
    from .loading import load as _load

    return _load(path, trust_remote_code=trust_remote_code)
