"""data/devices.py: device names from configs, and moving nested batches."""

import pytest
import torch

from data.devices import check_device_name, resolve_device, to_device

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")


def test_names_resolve():
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == resolve_device(None) == resolve_device(" Auto ") == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert [check_device_name(n) for n in ("cpu", "CUDA", "cuda:1", None)] == ["cpu", "cuda", "cuda:1", "auto"]


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "gpu", "mps", "cuda:", "cpu cuda"])
def test_bad_names_are_refused_naming_the_allowed_ones(name):
    with pytest.raises(ValueError, match=r"unknown device .*expected auto \| cpu \| cuda \| cuda:N"):
        resolve_device(name)


@needs_no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_is_refused_clearly_when_absent(name):
    assert check_device_name(name) == name  # the name itself is fine: a config may be for another machine
    with pytest.raises(ValueError, match=f"device '{name}' was asked for, but CUDA is not available here"):
        resolve_device(name)


def test_to_device_keeps_nesting_and_non_tensors():
    batch = {"ids": ["a", "b"], "x": torch.ones(2, 3), "n": 3, "none": None,
             "lang": {"mask": torch.ones(2, dtype=torch.bool), "pair": (torch.zeros(1), "t")},
             "list": [torch.ones(1), 1.5]}
    moved = to_device(batch, torch.device("cpu"))
    assert moved.keys() == batch.keys() and moved["ids"] == ["a", "b"] and moved["n"] == 3 and moved["none"] is None
    assert isinstance(moved["lang"]["pair"], tuple) and moved["lang"]["pair"][1] == "t"
    assert isinstance(moved["list"], list) and moved["list"][1] == 1.5
    assert torch.equal(moved["x"], batch["x"]) and moved["lang"]["mask"].dtype == torch.bool
    assert to_device(torch.arange(3), "cpu").tolist() == [0, 1, 2]
