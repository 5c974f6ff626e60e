import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, CLIPConfig, CLIPModel, ViTConfig, ViTModel

from teachers.tiny import ensure_tiny_teacher
from teachers.vision import HFVisionTeacher


def config(source, **overrides):
    return dict(dict(name="vis", kind="hf_vision", source=str(source), image_size=32), **overrides)


def images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 5 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


# arch -> tokens before the patches: ViT/CLIP/DINOv2 a CLS token, SigLIP none, DINOv2 + 4 registers
PREFIX = {"vit": 1, "clip": 1, "siglip": 0, "dinov2": 1, "dinov2_registers": 5}


@pytest.mark.parametrize("arch", sorted(PREFIX))
def test_shapes_prefix_tokens_and_summary(arch, cache_dir):
    folder = ensure_tiny_teacher(arch, cache_dir)
    teacher = HFVisionTeacher(config(folder), cache_dir)
    x = teacher.preprocess(images())
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    summary, features = teacher.soft_targets(x)
    ident = teacher.identity()
    assert ident["grid"] == [4, 4] and ident["num_patches"] == 16  # 32 px / patch 8
    assert summary.shape == (3, 32) and features.shape == (3, 16, 32)
    assert summary.dtype == features.dtype == np.float32
    assert teacher.num_prefix_tokens == PREFIX[arch]
    # against the bare HF model, run here independently
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(pixel_values=x)
    np.testing.assert_allclose(features, out.last_hidden_state[:, PREFIX[arch]:].numpy(), atol=1e-5)
    assert out.pooler_output is not None and ident["summary_from"] == "pooler_output"
    np.testing.assert_allclose(summary, out.pooler_output.numpy(), atol=1e-5)


def test_full_clip_folder_loads_its_vision_tower(tmp_path, cache_dir):
    vision = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=99)
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).eval()
    clip.save_pretrained(tmp_path / "clip")
    teacher = HFVisionTeacher(config(tmp_path / "clip"), cache_dir)
    tower = teacher.model.state_dict()
    for name, value in clip.vision_model.state_dict().items():
        assert torch.equal(tower[name], value), name
    x = teacher.preprocess(images())
    summary, features = teacher.soft_targets(x)
    with torch.no_grad():
        out = clip.vision_model(pixel_values=x)
    np.testing.assert_allclose(summary, out.pooler_output.numpy(), atol=1e-5)
    np.testing.assert_allclose(features, out.last_hidden_state[:, 1:].numpy(), atol=1e-5)
    assert teacher.identity()["summary_dim"] == 32  # the tower's width, not the projection's


def test_checkpoint_without_pooler_uses_the_cls_token(tmp_path, cache_dir):
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=4, intermediate_size=64), add_pooling_layer=False).eval()
    vit.save_pretrained(tmp_path / "vit")
    teacher = HFVisionTeacher(config(tmp_path / "vit"), cache_dir)
    assert teacher.identity()["summary_from"] == "cls"
    x = teacher.preprocess(images())
    summary, features = teacher.soft_targets(x)
    with torch.no_grad():
        hidden = vit(pixel_values=x).last_hidden_state.numpy()
    np.testing.assert_allclose(summary, hidden[:, 0], atol=1e-5)
    np.testing.assert_allclose(features, hidden[:, 1:], atol=1e-5)


def test_other_resolution_interpolates_and_changes_the_grid(cache_dir):
    teacher = HFVisionTeacher(config("tiny-random:vit", image_size=48), cache_dir)
    summary, features = teacher.soft_targets(teacher.preprocess(images(2)))
    assert teacher.identity()["grid"] == [6, 6] and features.shape == (2, 36, 32)


def test_preprocess(cache_dir):
    vit = HFVisionTeacher(config("tiny-random:vit"), cache_dir)  # no processor: 0.5 mean/std
    assert vit.processor is None
    gray = Image.new("L", (20, 30), color=204)
    np.testing.assert_allclose(vit.preprocess([gray]).numpy(), (204 / 255 - 0.5) / 0.5, atol=1e-6)
    clip = HFVisionTeacher(config("tiny-random:clip"), cache_dir)  # saved with a CLIP image processor
    assert clip.processor is not None
    x = clip.preprocess([Image.new("RGB", (64, 16), color=(255, 0, 0))])
    assert x.shape == (1, 3, 32, 32)  # resized to the square, not center-cropped from the short side
    expected = [(1 - 0.48145466) / 0.26862954, -0.4578275 / 0.26130258, -0.40821073 / 0.27577711]
    np.testing.assert_allclose(x[0, :, 16, 16].numpy(), expected, atol=1e-4)
    with pytest.raises(TypeError, match="image 1"):
        vit.preprocess([gray, np.zeros((8, 8, 3))])


def test_identity_digests(cache_dir):
    a = HFVisionTeacher(config("tiny-random:vit"), cache_dir).identity()
    assert HFVisionTeacher(config("tiny-random:vit"), cache_dir).identity() == a
    b = HFVisionTeacher(config(ensure_tiny_teacher("vit", cache_dir, seed=1)), cache_dir).identity()
    assert b["weights_digest"] != a["weights_digest"]
    assert {k: v for k, v in b.items() if k not in ("weights_digest", "source")} == \
        {k: v for k, v in a.items() if k not in ("weights_digest", "source")}


def test_bfloat16_outputs_float32(cache_dir):
    teacher = HFVisionTeacher(config("tiny-random:dinov2", dtype="bfloat16"), cache_dir)
    assert next(teacher.model.parameters()).dtype == torch.bfloat16
    summary, features = teacher.soft_targets(teacher.preprocess(images(2)))
    assert summary.dtype == features.dtype == np.float32 and np.isfinite(features).all()


def test_hub_id_offline_gives_a_clear_error(monkeypatch, cache_dir):
    import huggingface_hub.constants

    from teachers import TeacherSourceError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TeacherSourceError, match=r"'google/siglip-base-patch16-224'.*offline"):
        HFVisionTeacher(config("google/siglip-base-patch16-224"), cache_dir)
