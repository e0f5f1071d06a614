"""The model as a transformers citizen: attention back-ends, loss, hidden states, training features."""

import pytest
import torch
import torch.nn.functional as F

from modeling_ptt import PTForCausalLM, PTModel

from helpers import tiny_config, tiny_model
from test_oracles import reference_forward


def test_eager_and_sdpa_give_the_same_logits(input_ids):
    sdpa = tiny_model(attn_implementation="sdpa")
    eager = tiny_model(attn_implementation="eager")
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0  # left padding goes through the explicit mask path
    real = mask.bool()  # padded positions attend to nothing: their outputs are undefined in every back-end
    with torch.no_grad():
        torch.testing.assert_close(
            eager(input_ids, attention_mask=mask).logits[real],
            sdpa(input_ids, attention_mask=mask).logits[real],
            atol=1e-5,
            rtol=0,
        )


def test_track_weights_are_stacked_on_dim_zero():
    config = tiny_config()
    shapes = {name: tuple(p.shape) for name, p in PTForCausalLM(config).named_parameters()}
    n, d, hd = config.num_tracks, config.hidden_size, config.head_dim
    heads, kv, width = config.num_attention_heads_per_track, config.num_key_value_heads_per_track, config.intermediate_size_per_track
    assert shapes["model.embed_tokens.weight"] == (config.vocab_size, d)
    assert shapes["model.layers.0.input_layernorm.weight"] == (n, d)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (n, heads * hd, d)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (n, kv * hd, d)
    assert shapes["model.layers.0.self_attn.v_proj.weight"] == (n, kv * hd, d)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (n, d, heads * hd)
    assert shapes["model.layers.0.post_attention_layernorm.weight"] == (n, d)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (n, width, d)
    assert shapes["model.layers.0.mlp.up_proj.weight"] == (n, width, d)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (n, d, width)
    assert shapes["model.norm.weight"] == (d,)
    assert shapes["lm_head.weight"] == (config.vocab_size, d)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 33])
def test_track_linear_is_one_linear_per_track_in_both_matmul_forms(rows, bias):
    """Up to 4 rows per track (decoding) take the `W @ x^T` form on CPU, more take `x @ W^T`; both must be every
    track's own nn.functional.linear, values and gradients (fp32, atol 1e-5)."""
    from modeling_ptt.modeling_parallel_track import PTTrackLinear

    torch.manual_seed(0)
    layer = PTTrackLinear(3, 16, 24, bias=bias)
    torch.nn.init.normal_(layer.weight)
    if bias:
        torch.nn.init.normal_(layer.bias)
    tracks = torch.randn(3, 1, rows, 16, requires_grad=True)
    output = layer(tracks)
    expected = torch.stack([
        F.linear(tracks[t], layer.weight[t], layer.bias[t] if bias else None) for t in range(3)
    ])
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=0)
    assert output.is_contiguous()
    grads = torch.autograd.grad(output.square().sum(), [tracks, layer.weight])
    expected_grads = torch.autograd.grad(expected.square().sum(), [tracks, layer.weight])
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-4, rtol=1e-5)


def test_labels_give_the_shifted_cross_entropy(input_ids):
    model = tiny_model()
    labels = input_ids.clone()
    labels[0, :4] = -100
    output = model(input_ids, labels=labels)
    logits = output.logits[:, :-1].reshape(-1, model.config.vocab_size)
    expected = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(output.loss, expected)


def test_logits_to_keep(input_ids):
    model = tiny_model()
    with torch.no_grad():
        full = model(input_ids).logits
        last = model(input_ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, model.config.vocab_size)
    torch.testing.assert_close(last, full[:, -1:])


@pytest.mark.parametrize("num_tracks, depth, layers", [(4, 2, 5), (2, 3, 4)])
def test_hidden_states_are_the_track_mean_after_every_layer(num_tracks, depth, layers, input_ids):
    """Every entry, inside a block as at its end, is the mean of the tracks' streams in the per-track reference loop
    (fp32, atol 1e-5); the last one, as in Llama, is the final norm's output of the merged state."""
    model = tiny_model(num_tracks=num_tracks, track_block_depth=depth, num_hidden_layers=layers)
    expected = []
    with torch.no_grad():
        reference_forward(model, input_ids, hidden_states=expected)
        output = model(input_ids, output_hidden_states=True)
        base = model.model(input_ids)
    states = output.hidden_states
    assert len(states) == len(expected) == layers + 1
    for layer, (state, reference) in enumerate(zip(states[:-1], expected[:-1])):
        torch.testing.assert_close(state, reference, atol=1e-5, rtol=0, msg=lambda m: f"entry {layer}: {m}")
    # as in Llama, the last entry is the final norm's output, of the merged state after the last layer
    torch.testing.assert_close(states[-1], model.model.norm(expected[-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(states[-1], base.last_hidden_state)
    assert model(input_ids).hidden_states is None


def test_tied_embeddings_share_one_tensor():
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_base_model_returns_the_final_hidden_state(input_ids):
    config = tiny_config()
    base = PTModel(config).eval()
    assert base(input_ids).last_hidden_state.shape == (2, input_ids.shape[1], config.hidden_size)


def test_gradient_checkpointing_gives_the_same_gradients(input_ids):
    attention_calls = []

    def gradients(checkpointing):
        model = tiny_model(seed=5).train()
        if checkpointing:  # transformers 5.24 renamed the switch
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        model.model.layers[0].self_attn.register_forward_hook(lambda *args: attention_calls.append(checkpointing))
        model(input_ids, labels=input_ids).loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    assert attention_calls == [False, True, True]  # the checkpointed layer ran again in the backward pass
    assert all(grad is not None for grad in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_a_training_step_lowers_the_loss(input_ids):
    model = tiny_model(seed=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_torch_compile_of_the_forward(input_ids):
    model = tiny_model(num_hidden_layers=2)
    with torch.no_grad():
        expected = model(input_ids).logits
        compiled = torch.compile(model.forward, backend="inductor", fullgraph=False)
        torch.testing.assert_close(compiled(input_ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_inputs_embeds_equal_input_ids(input_ids):
    model = tiny_model()
    with torch.no_grad():
        torch.testing.assert_close(
            model(inputs_embeds=model.model.embed_tokens(input_ids)).logits, model(input_ids).logits
        )
    with pytest.raises(ValueError, match="exactly one"):
        model()
