import json
import math
from pathlib import Path

import pytest
import torch

from modeling_ptt import PTConfig, PTForCausalLM

from helpers import tiny_config


ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "overrides, field, values",
    [
        (dict(num_tracks=3), "num_attention_heads", ["8", "num_tracks=3"]),
        (dict(num_attention_heads=8, num_key_value_heads=2, num_tracks=4), "num_key_value_heads", ["2", "4"]),
        (dict(intermediate_size=66), "intermediate_size", ["66", "4"]),
        (dict(num_attention_heads=12, num_key_value_heads=8), "num_attention_heads", ["12", "8"]),
        (dict(hidden_size=36, num_tracks=2), "hidden_size", ["36", "8"]),
        (dict(track_block_depth=0), "track_block_depth", ["0"]),
        (dict(num_tracks=0), "num_tracks", ["0"]),
        (dict(num_tracks=-2), "num_tracks", ["-2"]),
        (dict(num_hidden_layers=0), "num_hidden_layers", ["0"]),
        (dict(sync_mode="sometimes"), "sync_mode", ["sometimes", "track_block"]),
        (dict(head_dim=0), "head_dim", ["0"]),
        (dict(track_block_depth=2.5), "track_block_depth", ["2.5"]),
    ],
)
def test_impossible_configs_raise_naming_the_field(overrides, field, values):
    with pytest.raises(ValueError) as excinfo:
        tiny_config(**overrides)
    message = str(excinfo.value)
    assert field in message
    for value in values:
        assert value in message


def test_hidden_size_need_not_divide_heads_when_head_dim_is_set():
    config = tiny_config(hidden_size=36, head_dim=8)
    assert config.head_dim == 8
    PTForCausalLM(config)


def test_derived_properties():
    config = tiny_config(num_hidden_layers=7, track_block_depth=3)
    assert config.num_attention_heads_per_track == 2
    assert config.num_key_value_heads_per_track == 1
    assert config.intermediate_size_per_track == 16
    assert config.num_sync_points == 3  # after layers 3, 6 and the last one (7)
    assert [i for i in range(7) if config.is_sync_layer(i)] == [2, 5, 6]
    tensor_parallel = tiny_config(num_hidden_layers=7, sync_mode="tensor_parallel")
    assert tensor_parallel.num_sync_points == 14
    with pytest.raises(AttributeError):
        config.num_sync_points = 1


def test_round_trip_through_save_and_to_dict(tmp_path):
    config = tiny_config(track_block_depth=3, sync_mode="tensor_parallel", tie_word_embeddings=True)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "ptt"
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_parallel_track.PTForCausalLM"
    reloaded = PTConfig.from_pretrained(tmp_path)
    from_dict = PTConfig(**config.to_dict())
    for other in (reloaded, from_dict):
        assert other.to_dict() == config.to_dict() | {"transformers_version": other.to_dict()["transformers_version"]}
        assert other.num_sync_points == config.num_sync_points


def test_a_saved_config_with_a_bad_field_fails_on_load(tmp_path):
    config = tiny_config()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(saved | {"num_tracks": 3}))
    with pytest.raises(ValueError, match="num_tracks=3"):
        PTConfig.from_pretrained(tmp_path)


def test_parameter_count_is_the_dense_count_plus_extra_norm_copies():
    """A PT model has the dense model's parameters plus n-1 extra copies of each per-layer norm vector."""
    config = tiny_config()
    model = PTForCausalLM(config)
    d, hd, L, n = config.hidden_size, config.head_dim, config.num_hidden_layers, config.num_tracks
    dense_layer = (
        d * config.num_attention_heads * hd * 2 + d * config.num_key_value_heads * hd * 2 + 3 * d * config.intermediate_size
    )
    dense = 2 * config.vocab_size * d + L * (dense_layer + 2 * d) + d
    assert sum(p.numel() for p in model.parameters()) == dense + L * 2 * d * (n - 1)


@pytest.mark.parametrize("name, billions", [("ptt-6b", 6), ("ptt-13b", 13), ("ptt-30b", 30)])
def test_paper_shapes_have_their_names_parameter_count(name, billions):
    config = PTConfig.from_json_file(ROOT / "configuration" / f"{name}.json")
    assert config.num_tracks == 8
    assert config.num_key_value_heads_per_track == 1
    with torch.device("meta"):
        model = PTForCausalLM(config)
    count = sum(p.numel() for p in model.parameters())
    assert math.isclose(count, billions * 1e9, rel_tol=0.10), count


def test_tiny_config_file_builds():
    config = PTConfig.from_json_file(ROOT / "configuration" / "ptt-tiny.json")
    assert config.num_sync_points < 2 * config.num_hidden_layers
    PTForCausalLM(config)
