"""Module paths: type, layer, peft's target match and peft's names."""

from l1ra_lite.module_paths import layer_index, matches_target, model_path, module_type, peft_path

PATH = "model.layers.3.self_attn.q_proj"


def test_a_path_has_a_type_and_a_layer():
    assert module_type(PATH) == "q_proj" and layer_index(PATH) == 3
    assert layer_index("lm_head") is None


def test_a_target_name_matches_whole_dotted_parts_at_the_end():
    assert matches_target(PATH, "q_proj")
    assert matches_target(PATH, "layers.3.self_attn.q_proj") and matches_target(PATH, PATH)
    assert not matches_target(PATH, "proj")  # not part of a name
    assert not matches_target(PATH, "self_attn")  # not the end
    assert not matches_target("model.layers.13.self_attn.q_proj", "3.self_attn.q_proj")


def test_peft_names_are_the_path_behind_a_prefix_and_back():
    assert peft_path(PATH) == "base_model.model." + PATH
    assert model_path(peft_path(PATH)) == PATH
    assert model_path(PATH) == PATH  # a name without the prefix is already a path
