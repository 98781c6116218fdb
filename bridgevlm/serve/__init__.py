"""Serving a model over OpenAI's chat-completions API with continuous batching, and a web chat page."""
