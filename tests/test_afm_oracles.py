"""One-track oracles for the AFM 2025 layer options: with `num_tracks=1` a PT model with

- every FFN sparse            is transformers' `MixtralForCausalLM`,
- `qk_norm` (+ sliding layers) is `Qwen3ForCausalLM`,
- a sliding window everywhere is `MistralForCausalLM`,
- NoPE and sliding layers     is `SmolLM3ForCausalLM`,

given the same weights: logits within 1e-5 (fp32) and identical greedy tokens, for prompts longer than the window and
with the dynamic and the static cache. Weights map one to one: a one-track PT tensor is the oracle tensor with a
leading track dim of 1 (Mixtral's `mlp.gate.weight` [E, d] -> [1, E, d], `mlp.experts.gate_up_proj` [E, 2I, d] ->
[1, E, 2I, d], `mlp.experts.down_proj` [E, d, I] -> [1, E, d, I]; the same layout in transformers 5.17 and 5.24).
"""

import pytest
import torch
from transformers import (
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from modeling_ptt import PTConfig, PTForCausalLM


ATOL = 1e-5
WINDOW = 5
# Large enough init that a wrong window, rotation or routing moves the logits far beyond ATOL.
SHAPE = dict(
    vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.2, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=None, eos_token_id=None,
    pad_token_id=None,
)
SHARED = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def with_random_norms(oracle):
    """At init every norm weight is 1.0, which hides where a norm applies (an RMSNorm of unit weight commutes with
    RoPE, a rotation): random weights in (0.5, 1.5) make QK-norm after RoPE, or a norm weight in the wrong place,
    change the logits."""
    with torch.no_grad():
        for name, weight in oracle.named_parameters():
            if "norm" in name:
                weight.uniform_(0.5, 1.5)
    return oracle


def one_track_twin(oracle, **pt_fields) -> PTForCausalLM:
    """The one-track PT model holding `oracle`'s weights (every per-track tensor gains a track dim of 1)."""
    config = PTConfig(**SHAPE, num_hidden_layers=oracle.config.num_hidden_layers, num_tracks=1,
                      track_block_depth=1, **pt_fields)
    config._attn_implementation = oracle.config._attn_implementation
    model = PTForCausalLM(config).eval()
    state = {name: t if name in SHARED else t.unsqueeze(0) for name, t in oracle.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return model


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, 3 * WINDOW tokens long; the second is left-padded by 4."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, SHAPE["vocab_size"], (2, 3 * WINDOW), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0
    return input_ids, attention_mask


def assert_same_logits_and_tokens(oracle, model, cache_implementations=("dynamic",)):
    input_ids, attention_mask = prompts()
    with torch.no_grad():
        expected = oracle(input_ids, attention_mask=attention_mask).logits
        actual = model(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()  # padded positions are not defined by either model
    torch.testing.assert_close(actual[real], expected[real], atol=ATOL, rtol=0)
    for cache_implementation in cache_implementations:
        args = dict(max_new_tokens=2 * WINDOW, do_sample=False, cache_implementation=cache_implementation)
        expected_tokens = oracle.generate(input_ids, attention_mask=attention_mask, **args)
        actual_tokens = model.generate(input_ids, attention_mask=attention_mask, **args)
        assert torch.equal(actual_tokens, expected_tokens), cache_implementation
    return expected


def mixtral_and_twin(num_hidden_layers: int) -> tuple[MixtralForCausalLM, PTForCausalLM]:
    mixtral_config = MixtralConfig(
        **SHAPE, num_hidden_layers=num_hidden_layers, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
        router_aux_loss_coef=0.05, attn_implementation="sdpa", experts_implementation="eager",
    )
    mixtral = with_random_norms(MixtralForCausalLM(mixtral_config).eval())
    return mixtral, one_track_twin(mixtral, intermediate_size=96, num_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=48, router_aux_loss_coef=0.05)


@pytest.mark.parametrize("experts_implementation", ["grouped_mm", "batched_mm", "eager"])
def test_all_sparse_one_track_model_is_mixtral(experts_implementation):
    torch.manual_seed(0)
    mixtral, model = mixtral_and_twin(num_hidden_layers=3)
    model.set_experts_implementation(experts_implementation)
    assert model.config.mlp_layer_types == ["sparse"] * 3

    assert_same_logits_and_tokens(mixtral, model)

    # The router logits, and the loss with labels and padding. Our load-balancing loss is Mixtral's of every layer's
    # router on its own, averaged (Mixtral pools all layers first; see pt_load_balancing_loss), so its oracle is
    # transformers' function applied to each of Mixtral's layers.
    input_ids, attention_mask = prompts()
    with torch.no_grad():
        expected = mixtral(input_ids, attention_mask=attention_mask, labels=input_ids, output_router_logits=True)
        actual = model(input_ids, attention_mask=attention_mask, labels=input_ids, output_router_logits=True)
    assert len(actual.router_logits) == len(expected.router_logits) == 3
    for ours, theirs in zip(actual.router_logits, expected.router_logits):
        torch.testing.assert_close(ours, theirs.unsqueeze(0), atol=ATOL, rtol=0)
    per_layer = [load_balancing_loss_func((layer,), 4, 2, attention_mask) for layer in expected.router_logits]
    expected_aux_loss = torch.stack(per_layer).mean()
    torch.testing.assert_close(actual.aux_loss, expected_aux_loss, atol=ATOL, rtol=0)
    cross_entropy = expected.loss - 0.05 * expected.aux_loss
    torch.testing.assert_close(actual.loss, cross_entropy + 0.05 * expected_aux_loss, atol=ATOL, rtol=0)


def test_one_sparse_layer_load_balancing_loss_is_mixtrals():
    """With one sparse layer there is nothing to pool: aux_loss and loss are Mixtral's own numbers."""
    torch.manual_seed(0)
    mixtral, model = mixtral_and_twin(num_hidden_layers=1)
    input_ids, attention_mask = prompts()
    with torch.no_grad():
        expected = mixtral(input_ids, attention_mask=attention_mask, labels=input_ids, output_router_logits=True)
        actual = model(input_ids, attention_mask=attention_mask, labels=input_ids, output_router_logits=True)
    torch.testing.assert_close(actual.aux_loss, expected.aux_loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(actual.loss, expected.loss, atol=ATOL, rtol=0)


def test_qk_norm_one_track_model_is_qwen3():
    torch.manual_seed(0)
    layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    qwen3 = with_random_norms(Qwen3ForCausalLM(Qwen3Config(
        **SHAPE, num_hidden_layers=3, intermediate_size=96, use_sliding_window=True, sliding_window=WINDOW,
        layer_types=layer_types, attn_implementation="sdpa",
    )).eval())
    model = one_track_twin(qwen3, intermediate_size=96, qk_norm=True, layer_types=layer_types, sliding_window=WINDOW)
    expected = assert_same_logits_and_tokens(qwen3, model, ("dynamic", "static"))

    # the norms matter: the same weights without QK-norm give other logits
    for layer in model.model.layers:
        layer.self_attn.q_norm = layer.self_attn.k_norm = None
    with torch.no_grad():
        without_norm = model(prompts()[0]).logits
    assert (without_norm[0] - expected[0]).abs().max() > 100 * ATOL


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_sliding_window_one_track_model_is_mistral(attn_implementation):
    torch.manual_seed(0)
    mistral = with_random_norms(MistralForCausalLM(MistralConfig(
        **SHAPE, num_hidden_layers=3, intermediate_size=96, sliding_window=WINDOW,
        attn_implementation=attn_implementation,
    )).eval())
    model = one_track_twin(mistral, intermediate_size=96, sliding_window=WINDOW)
    assert model.config.layer_types == ["sliding_attention"] * 3  # Mistral's reading: the window is on every layer
    expected = assert_same_logits_and_tokens(mistral, model, ("dynamic", "static"))

    # the window matters for prompts longer than it
    with torch.no_grad():
        full = one_track_twin(mistral, intermediate_size=96)(prompts()[0]).logits
    assert (full[0, WINDOW:] - expected[0, WINDOW:]).abs().max() > 100 * ATOL


def test_nope_and_sliding_one_track_model_is_smollm3():
    """AFM's attention pattern: three sliding-window RoPE layers, then one global layer without position encoding."""
    torch.manual_seed(0)
    no_rope_layers = [1, 1, 1, 0]
    layer_types = ["sliding_attention"] * 3 + ["full_attention"]
    smollm3 = with_random_norms(SmolLM3ForCausalLM(SmolLM3Config(
        **SHAPE, num_hidden_layers=4, intermediate_size=96, no_rope_layers=no_rope_layers, use_sliding_window=True,
        sliding_window=WINDOW, layer_types=layer_types, attn_implementation="sdpa",
    )).eval())
    model = one_track_twin(smollm3, intermediate_size=96, no_rope_layers=no_rope_layers, layer_types=layer_types,
                           sliding_window=WINDOW)
    expected = assert_same_logits_and_tokens(smollm3, model, ("dynamic", "static"))

    # the NoPE layer matters: with RoPE on it the logits change
    model.model.layers[3].self_attn.use_rope = True
    with torch.no_grad():
        with_rope = model(prompts()[0]).logits
    assert (with_rope[0] - expected[0]).abs().max() > 100 * ATOL
