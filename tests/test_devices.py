"""latentdub.devices: device names are checked against this machine, with clear messages."""

from __future__ import annotations

import pytest
import torch

from latentdub.devices import default_device, parse_device, parse_devices
from latentdub.errors import InputError


@pytest.fixture()
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture()
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_cpu_is_always_there(no_gpu: None) -> None:
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(" CPU ") == torch.device("cpu")
    assert parse_device(torch.device("cpu")) == torch.device("cpu")
    assert default_device() == "cpu"


@pytest.mark.parametrize("name", ["nosuch", "cuda:x", "", "gpu0"])
def test_unknown_names_say_what_to_use(no_gpu: None, name: str) -> None:
    with pytest.raises(InputError, match="use cpu, cuda") as err:
        parse_device(name)
    assert err.value.__cause__ is None  # no torch traceback behind the message


def test_a_known_but_unsupported_device_type(no_gpu: None) -> None:
    with pytest.raises(InputError, match=r"'meta' is not supported; use cpu, cuda:N or mps"):
        parse_device("meta")


def test_cuda_on_a_machine_without_one(no_gpu: None) -> None:
    with pytest.raises(InputError, match=r"--devices: cuda:7 was requested but this machine has no CUDA GPU.*use cpu"):
        parse_device("cuda:7", flag="--devices")
    with pytest.raises(InputError, match="no CUDA GPU"):
        parse_device("cuda")
    with pytest.raises(InputError, match="Apple MPS is not available"):
        parse_device("mps")


def test_a_cuda_index_past_the_last_gpu(two_gpus: None) -> None:
    assert parse_device("cuda:1") == torch.device("cuda:1")
    assert parse_device("cuda") == torch.device("cuda")
    with pytest.raises(InputError, match=r"cuda:7 does not exist; this machine has 2 CUDA GPU\(s\): cuda:0, cuda:1"):
        parse_device("cuda:7")


def test_device_lists(two_gpus: None) -> None:
    assert parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    assert parse_devices("cuda,cuda:1") == ["cuda:0", "cuda:1"]  # a bare cuda is cuda:0
    assert parse_devices(None) == ["cuda:0"]
    assert parse_devices("  ") == ["cuda:0"]


def test_device_lists_refuse_duplicates_and_gaps(no_gpu: None) -> None:
    with pytest.raises(InputError, match="--devices lists cpu twice"):
        parse_devices("cpu,cpu")
    with pytest.raises(InputError, match="has an empty entry"):
        parse_devices("cpu,,cpu")
    with pytest.raises(InputError, match="--devices: unknown device 'tpu'"):
        parse_devices("cpu,tpu")


def test_cuda_and_cuda0_are_the_same_worker(two_gpus: None) -> None:
    with pytest.raises(InputError, match="lists cuda:0 twice"):
        parse_devices("cuda,cuda:0")
