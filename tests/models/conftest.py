"""The in-LLM connector tests run on a tiny Llama and a tiny OPT."""
import pytest


@pytest.fixture(params=["llama", "opt"])
def parts(request, vlm_parts, opt_parts, single_thread):
    return {"llama": vlm_parts, "opt": opt_parts}[request.param]
