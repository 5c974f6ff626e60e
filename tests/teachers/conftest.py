import pytest

from teachers.language import HFCausalLMTeacher
from teachers.tiny import ensure_tiny_teacher


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("teacher_cache")


@pytest.fixture(scope="session")
def llama_dir(cache_dir):
    return ensure_tiny_teacher("llama", cache_dir)


@pytest.fixture(scope="session")
def lm(llama_dir, cache_dir):
    return HFCausalLMTeacher(dict(name="lm", kind="hf_causal_lm", source=str(llama_dir), top_k=8), cache_dir)
