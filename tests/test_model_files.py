"""model_files.ModelFiles, the one reader of a model directory's safetensors: one rule for which files hold
the weights, shared by merge --into-base and diagnose --base; headers read without tensors; one tensor at a
time, bit for bit."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lrtool.diagnose.base_check import BaseWeights
from lrtool.errors import InputError, UnsupportedFeatureError
from lrtool.merge.into_base import open_base
from lrtool.model_files import DTYPES, ModelFiles

torch.set_num_threads(1)


def weights(*names: str) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": torch.full((2, 3), float(i)) for i, name in enumerate(names)}


def model_dir(directory, files: dict[str, dict], index: str | None = None):
    """A model directory holding `files` (file name -> tensors), config.json, and an index naming them."""
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    for name, tensors in files.items():
        save_file(tensors, directory / name)
    if index is not None:
        weight_map = {key: name for name, tensors in files.items() for key in tensors}
        (directory / index).write_text(json.dumps({"weight_map": weight_map}))
    return directory


def test_an_index_names_the_shards_and_model_safetensors_index_comes_first(tmp_path):
    shards = {"a.safetensors": weights("x"), "b.safetensors": weights("y")}
    directory = model_dir(tmp_path / "m", shards, index="model.safetensors.index.json")
    (directory / "other.safetensors.index.json").write_text(json.dumps({"weight_map": {"z.weight": "c"}}))
    files = ModelFiles.open(directory)
    assert files.index.name == "model.safetensors.index.json"
    assert files.module_names == ["x", "y"]


def test_one_other_index_is_taken_and_two_are_refused(tmp_path):
    shards = {"a.safetensors": weights("x"), "b.safetensors": weights("y")}
    directory = model_dir(tmp_path / "m", shards, index="pytorch_model.safetensors.index.json")
    assert ModelFiles.open(directory).module_names == ["x", "y"]
    (directory / "second.safetensors.index.json").write_text("{}")
    with pytest.raises(InputError, match="several safetensors indexes"):
        ModelFiles.open(directory)


def test_without_an_index_model_safetensors_or_the_only_file_holds_the_weights(tmp_path):
    directory = model_dir(
        tmp_path / "m", {"model.safetensors": weights("x"), "extra.safetensors": weights("y")}
    )
    assert ModelFiles.open(directory).module_names == ["x"]
    single = model_dir(tmp_path / "s", {"weights.safetensors": weights("x")})
    assert ModelFiles.open(single).module_names == ["x"]
    several = model_dir(tmp_path / "n", {"a.safetensors": weights("x"), "b.safetensors": weights("y")})
    with pytest.raises(InputError, match="several .safetensors files and no index"):
        ModelFiles.open(several)


def test_pickled_weights_are_refused_unread_and_no_weights_is_said(tmp_path):
    directory = model_dir(tmp_path / "m", {})
    with pytest.raises(InputError, match="no weights"):
        ModelFiles.open(directory)
    (directory / "pytorch_model.bin").write_bytes(b"not even a pickle")  # never opened
    with pytest.raises(UnsupportedFeatureError, match="only pickled weights"):
        ModelFiles.open(directory)


def test_merge_and_diagnose_read_a_directory_the_same_way(tmp_path):
    directory = model_dir(
        tmp_path / "m", {"model.safetensors": weights("x"), "extra.safetensors": weights("y")}
    )
    assert list(BaseWeights.read(str(directory)).shapes) == open_base(directory).module_names == ["x"]
    several = model_dir(tmp_path / "n", {"a.safetensors": weights("x"), "b.safetensors": weights("y")})
    for read in (lambda: BaseWeights.read(str(several)), lambda: open_base(several)):
        with pytest.raises(InputError, match="several .safetensors files and no index"):
            read()


@pytest.mark.parametrize("code", list(DTYPES))
def test_a_tensor_is_read_bit_for_bit_in_its_own_dtype(tmp_path, code):
    dtype = getattr(torch, DTYPES[code][0])
    tensor = torch.arange(12, dtype=torch.float64).reshape(3, 4).to(dtype)
    directory = model_dir(tmp_path / "m", {"model.safetensors": {"t.weight": tensor, "u": torch.ones(1)}})
    files = ModelFiles.open(directory)
    assert files.tensors["t.weight"].dtype == code
    assert files.tensors["t.weight"].end - files.tensors["t.weight"].begin == 12 * DTYPES[code][1]
    read = files.read("t.weight")
    expected = load_file(directory / "model.safetensors")["t.weight"]
    assert read.dtype == expected.dtype and torch.equal(read.view(torch.uint8), expected.view(torch.uint8))
