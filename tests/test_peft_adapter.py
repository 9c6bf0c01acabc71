"""The peft LoRA folder: what save_peft_adapter writes, the shared reader reads back."""

import pytest
import torch

from l1ra_lite.errors import UserError
from l1ra_lite.l1ra import inject_adapters
from l1ra_lite.peft_adapter import (
    configured_rank,
    read_adapter_config,
    read_lora_ranks,
    read_lora_tensors,
    save_peft_adapter,
    split_lora_key,
)
from tests.tiny import tiny_llama


@pytest.fixture
def written(tmp_path):
    adapters = inject_adapters(tiny_llama(), budget=29, seed=0)  # 14 adapters: ranks 3 and 2
    folder = save_peft_adapter(
        adapters, tmp_path / "adapter", "tiny", lora_alpha=2.0, dropout=0.0, target_modules=["q_proj"]
    )
    return adapters, folder


def test_what_is_written_reads_back_by_module_path(written):
    adapters, folder = written
    assert read_lora_ranks(folder) == {p: a.rank for p, a in adapters.items()}
    tensors = read_lora_tensors(folder)
    assert set(tensors["lora_A"]) == set(tensors["lora_B"]) == set(adapters)
    for path, adapter in adapters.items():
        assert torch.equal(tensors["lora_A"][path], adapter.lora_A.detach())
    config = read_adapter_config(folder)
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == 2.0
    assert all(configured_rank(config, p) == a.rank for p, a in adapters.items())


def test_a_rank_pattern_key_picks_modules_as_peft_does():
    config = {"r": 8, "rank_pattern": {"layers.0.mlp.down_proj": 3, "q_proj": 5}}
    assert configured_rank(config, "model.layers.0.mlp.down_proj") == 3
    assert configured_rank(config, "model.layers.1.self_attn.q_proj") == 5
    assert configured_rank(config, "model.layers.1.mlp.down_proj") == 8  # no key: the global r
    assert configured_rank({}, "model.layers.1.mlp.down_proj") is None


def test_tensor_names_split_into_module_path_and_kind():
    assert split_lora_key("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight") == (
        "model.layers.0.mlp.up_proj",
        "lora_B",
    )
    assert split_lora_key("base_model.model.lm_head.weight") is None


def test_unreadable_folders_are_one_line_user_errors(written, tmp_path):
    _, folder = written
    (folder / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="top level must be an object"):
        read_adapter_config(folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        read_adapter_config(folder)
    (folder / "adapter_model.safetensors").write_bytes(b"garbage")
    for read in (read_lora_ranks, read_lora_tensors):
        with pytest.raises(UserError, match="not a readable safetensors file"):
            read(folder)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="has no adapter_model.safetensors"):
        read_lora_ranks(folder)
