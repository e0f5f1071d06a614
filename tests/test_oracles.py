"""Independent oracles: transformers' own Llama, and a slow reference written from the paper's pseudocode."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from modeling_ptt import PTForCausalLM

from helpers import llama_config_like, tiny_llama, tiny_model


ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-5  # fp32


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def reference_forward(
    model: PTForCausalLM, input_ids: torch.Tensor, hidden_states: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """PT as the paper writes it: a Python loop over layers and tracks, plain torch ops, no batching over tracks.
    A `hidden_states` list receives the embedding and, after every layer, the mean of the tracks' streams."""
    config, weights = model.config, model.state_dict()
    n, hd, eps = config.num_tracks, config.head_dim, config.rms_norm_eps
    heads, kv_heads = config.num_attention_heads_per_track, config.num_key_value_heads_per_track
    batch, seq_len = input_ids.shape

    positions = torch.arange(seq_len, dtype=torch.float32)
    theta = config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.cat([torch.outer(positions, inv_freq)] * 2, dim=-1)
    cos, sin = angles.cos(), angles.sin()
    causal = torch.full((seq_len, seq_len), float("-inf")).triu(1)

    def rms_norm(h, weight):
        return weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)

    def attention(h, layer, t):
        def project(name, num_heads):
            w = weights[f"model.layers.{layer}.self_attn.{name}.weight"][t]
            return (h @ w.T).view(batch, seq_len, num_heads, hd).transpose(1, 2)

        q, k, v = project("q_proj", heads), project("k_proj", kv_heads), project("v_proj", kv_heads)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
        probs = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5 + causal, dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(batch, seq_len, heads * hd)
        return out @ weights[f"model.layers.{layer}.self_attn.o_proj.weight"][t].T

    def ffn(h, layer, t):
        w = {name: weights[f"model.layers.{layer}.mlp.{name}.weight"][t] for name in ("gate_proj", "up_proj", "down_proj")}
        return (F.silu(h @ w["gate_proj"].T) * (h @ w["up_proj"].T)) @ w["down_proj"].T

    def mean_merge(streams):
        merged = sum(streams) / n
        return [merged] * n

    tensor_parallel = config.sync_mode == "tensor_parallel"
    embedded = weights["model.embed_tokens.weight"][input_ids]
    streams = [embedded] * n  # every track starts from the shared embedding
    if hidden_states is not None:
        hidden_states.append(embedded)
    for layer in range(config.num_hidden_layers):
        streams = [
            h + attention(rms_norm(h, weights[f"model.layers.{layer}.input_layernorm.weight"][t]), layer, t)
            for t, h in enumerate(streams)
        ]
        if tensor_parallel:
            streams = mean_merge(streams)
        streams = [
            h + ffn(rms_norm(h, weights[f"model.layers.{layer}.post_attention_layernorm.weight"][t]), layer, t)
            for t, h in enumerate(streams)
        ]
        if hidden_states is not None:
            hidden_states.append(sum(streams) / n)
        if tensor_parallel or (layer + 1) % config.track_block_depth == 0 or layer == config.num_hidden_layers - 1:
            streams = mean_merge(streams)
    final = rms_norm(streams[0], weights["model.norm.weight"])
    return final @ weights["lm_head.weight"].T


@pytest.mark.parametrize(
    "num_tracks, depth, layers, sync_mode",
    [
        (1, 1, 3, "track_block"),
        (2, 1, 3, "track_block"),
        (2, 2, 4, "track_block"),
        (4, 2, 5, "track_block"),  # D does not divide L: the last block is one layer
        (4, 3, 5, "track_block"),
        (4, 8, 5, "track_block"),  # D > L: tracks only meet after the last layer
        (4, 1, 3, "tensor_parallel"),
    ],
)
def test_batched_model_equals_the_per_track_reference(num_tracks, depth, layers, sync_mode, input_ids):
    model = tiny_model(num_tracks=num_tracks, track_block_depth=depth, num_hidden_layers=layers, sync_mode=sync_mode)
    with torch.no_grad():
        expected = reference_forward(model, input_ids)
        actual = model(input_ids).logits
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_track_block_depth_changes_the_function(input_ids):
    """Guards the reference test against a merge that does nothing: different D must give different logits."""
    every_layer = tiny_model(track_block_depth=1)
    only_at_end = tiny_model(track_block_depth=5)
    only_at_end.load_state_dict(every_layer.state_dict())
    with torch.no_grad():
        assert (every_layer(input_ids).logits - only_at_end(input_ids).logits).abs().max() > 1e-2


@pytest.mark.parametrize("bias", [False, True])
def test_one_track_equals_transformers_llama(bias, input_ids):
    model = tiny_model(num_tracks=1, attention_bias=bias, mlp_bias=bias)
    llama = LlamaForCausalLM(llama_config_like(model.config)).eval()
    # the track dim of size 1 is the only difference in layout
    llama.load_state_dict({name: tensor.squeeze(0) if name.startswith("model.layers.") else tensor
                           for name, tensor in model.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, llama(input_ids).logits, atol=ATOL, rtol=0)
    prompt = input_ids[:1]
    ours = model.generate(prompt, max_new_tokens=12, do_sample=False)
    theirs = llama.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("num_tracks", [2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_from_llama_computes_the_dense_model(num_tracks, bias, input_ids):
    llama = tiny_llama(attention_bias=bias, mlp_bias=bias)
    model = PTForCausalLM.from_llama(llama, num_tracks=num_tracks)
    assert model.config.sync_mode == "tensor_parallel"
    assert model.config.num_tracks == num_tracks
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, llama(input_ids).logits, atol=ATOL, rtol=0)
    assert torch.equal(
        model.generate(input_ids[:1], max_new_tokens=8, do_sample=False),
        llama.generate(input_ids[:1], max_new_tokens=8, do_sample=False),
    )


def test_from_llama_refuses_a_track_count_that_does_not_divide_the_heads():
    with pytest.raises(ValueError, match="num_tracks=3"):
        PTForCausalLM.from_llama(tiny_llama(), num_tracks=3)


@pytest.mark.parametrize("bias", [False, True])
def test_to_llama_is_from_llama_inverted_and_a_one_track_model_is_its_llama(bias, input_ids):
    llama = tiny_llama(attention_bias=bias, mlp_bias=bias)
    back = PTForCausalLM.from_llama(llama, num_tracks=4).to_llama()
    assert type(back) is LlamaForCausalLM
    for name, tensor in llama.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, atol=1e-6, rtol=0, msg=name)
    one_track = tiny_model(num_tracks=1, attention_bias=bias, mlp_bias=bias)  # block mode: one track is dense anyway
    with torch.no_grad():
        torch.testing.assert_close(one_track.to_llama()(input_ids).logits, one_track(input_ids).logits,
                                   atol=ATOL, rtol=0)


def test_to_llama_refuses_a_model_that_is_not_dense():
    with pytest.raises(ValueError, match="num_tracks=4 with sync_mode='track_block'"):
        tiny_model().to_llama()
    with pytest.raises(ValueError, match="PTConfig.qk_norm=True"):
        tiny_model(num_tracks=1, qk_norm=True).to_llama()
    model = PTForCausalLM.from_llama(tiny_llama(), num_tracks=2)
    with torch.no_grad():  # e.g. after training in tensor-parallel mode: each track's norm learns on its own
        model.model.layers[1].post_attention_layernorm.weight[0] += 0.1
    with pytest.raises(ValueError, match=r"model\.layers\.1\.post_attention_layernorm\.weight: the 2 tracks"):
        model.to_llama()


def test_convert_llama_script(tmp_path, input_ids):
    llama = tiny_llama()
    llama.save_pretrained(tmp_path / "llama")
    result = subprocess.run(
        [sys.executable, ROOT / "scripts" / "convert_llama.py", tmp_path / "llama", tmp_path / "ptt", "--num-tracks", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    converted = PTForCausalLM.from_pretrained(tmp_path / "ptt").eval()
    assert converted.config.num_tracks == 2
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids).logits, llama(input_ids).logits, atol=ATOL, rtol=0)


def test_convert_llama_script_names_a_missing_input(tmp_path):
    result = subprocess.run(
        [sys.executable, ROOT / "scripts" / "convert_llama.py", tmp_path / "nowhere", tmp_path / "out", "--num-tracks", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "nowhere" in result.stderr
