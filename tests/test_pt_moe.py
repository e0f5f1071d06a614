"""PT-MoE with several tracks: a per-track reference loop, track locality, the load-balancing loss in training, the
AFM-shaped config's parameter counts, the new config fields' validation, and the dense model left as it was."""

import copy
from pathlib import Path

import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer, Qwen3MoeRotaryEmbedding

from helpers import AFM_OPTIONS, TINY, run_without_package, tiny_config, tiny_model
from modeling_ptt import PTConfig, PTForCausalLM


ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-5


def per_track_reference(model: PTForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """The PT forward written the slow way: each track runs on its own through transformers' Qwen3-MoE decoder layers
    holding that track's slice of the weights, the tracks meet only at the merges (mean), masks and blocks built by
    hand. A NoPE layer gets the identity rotation (cos 1, sin 0)."""
    config = model.config
    num_layers, depth, seq_len = config.num_hidden_layers, config.track_block_depth, input_ids.shape[1]
    track_config = Qwen3MoeConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=num_layers,
        intermediate_size=config.intermediate_size_per_track, head_dim=config.head_dim,
        num_attention_heads=config.num_attention_heads_per_track,
        num_key_value_heads=config.num_key_value_heads_per_track, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=config.rope_parameters, num_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok, moe_intermediate_size=config.moe_intermediate_size,
        norm_topk_prob=config.norm_topk_prob, decoder_sparse_step=1,
        mlp_only_layers=[i for i, kind in enumerate(config.mlp_layer_types) if kind == "dense"],
        attn_implementation="eager", experts_implementation="eager",
    )
    tracks = []
    for track in range(config.num_tracks):
        layers = [Qwen3MoeDecoderLayer(track_config, i).eval() for i in range(num_layers)]
        for layer, pt_layer in zip(layers, model.model.layers):
            layer.load_state_dict({name: w[track] for name, w in pt_layer.state_dict().items()}, strict=True)
        tracks.append(layers)

    hidden = model.model.embed_tokens(input_ids)
    rope = Qwen3MoeRotaryEmbedding(track_config)(hidden, torch.arange(seq_len)[None])
    nope = (torch.ones_like(rope[0]), torch.zeros_like(rope[1]))
    query, key = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None, :]
    allowed = {"full_attention": key <= query,
               "sliding_attention": (key <= query) & (key > query - config.sliding_window)}
    masks = {kind: torch.zeros(seq_len, seq_len).masked_fill(~ok, torch.finfo(torch.float32).min)[None, None]
             for kind, ok in allowed.items()}
    for start in range(0, num_layers, depth):
        outputs = []
        for layers in tracks:
            states = hidden
            for i in range(start, min(start + depth, num_layers)):
                position_embeddings = rope if config.no_rope_layers[i] else nope
                states = layers[i](states, attention_mask=masks[config.layer_types[i]],
                                   position_embeddings=position_embeddings)
            outputs.append(states)
        hidden = torch.stack(outputs).mean(0)
    return model.lm_head(model.model.norm(hidden))


@pytest.mark.parametrize("num_tracks, norm_topk_prob", [(2, True), (4, False)])
def test_batched_pt_moe_equals_per_track_reference(num_tracks, norm_topk_prob):
    model = tiny_model(num_tracks=num_tracks, attn_implementation="eager", norm_topk_prob=norm_topk_prob, **AFM_OPTIONS)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        expected = per_track_reference(model, input_ids)
        for experts_implementation in ("grouped_mm", "eager"):
            model.set_experts_implementation(experts_implementation)
            torch.testing.assert_close(model(input_ids).logits, expected, atol=ATOL, rtol=0)


def test_eager_experts_kernel_equals_grouped_mm_forward_and_backward():
    """Our CPU kernel (`PTFoldedExperts.forward`, the "eager" implementation) against transformers' grouped_mm
    kernel on the same folded experts, for routings that give experts no row, one row (padded to two columns), a
    few rows and 16 or more (the two matmul forms), including the gradients of inputs, weights and routing
    weights. fp32, atol 1e-5."""
    from modeling_ptt.modeling_parallel_track import PTExperts

    torch.manual_seed(0)
    config = tiny_config(num_tracks=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                         mlp_layer_types=["sparse"] * 5)
    experts = PTExperts(config)
    for weight in experts.parameters():
        torch.nn.init.normal_(weight, std=0.1)
    rows_seen = []
    for num_tokens, top_k_index in [
        (1, torch.tensor([[[0, 2]], [[3, 1]]])),  # decoding one token: one row per chosen expert
        (5, torch.randint(0, 4, (2, 5, 1)).repeat(1, 1, 2).add_(torch.tensor([0, 1])).remainder_(4)),
        (40, torch.randn(2, 40, 4).topk(2, dim=-1).indices),  # 20 rows per expert on average
    ]:
        rows_seen += torch.stack([torch.bincount(track.flatten(), minlength=4) for track in top_k_index]).tolist()
        rows = torch.randn(2, num_tokens, config.hidden_size, requires_grad=True)
        top_k_weights = torch.rand(2, num_tokens, 2, requires_grad=True)
        results = {}
        for implementation in ("eager", "grouped_mm"):
            config._experts_implementation = implementation
            output = experts(rows, top_k_index, top_k_weights)
            grads = torch.autograd.grad(output.square().sum(), [rows, top_k_weights, *experts.parameters()])
            results[implementation] = (output, *grads)
        for eager, grouped in zip(results["eager"], results["grouped_mm"]):
            torch.testing.assert_close(eager, grouped, atol=ATOL, rtol=0)
    rows_seen = sum(rows_seen, [])
    assert 0 in rows_seen and 1 in rows_seen and any(1 < rows < 16 for rows in rows_seen) and max(rows_seen) >= 16


def test_a_track_needs_only_its_own_weights():
    """Experts never leave their track: a sparse layer holding only tracks [2, 4) of every weight (what a rank that
    owns those tracks loads: dim 0 of every layer tensor is the track) computes exactly those tracks of the full
    layer. So the layer itself needs no collective; the merge stays the only one."""
    model = tiny_model(num_tracks=4, **AFM_OPTIONS)
    layer = model.model.layers[1]
    assert isinstance(layer.mlp, type(model.model.layers[3].mlp)) and hasattr(layer.mlp, "experts")
    assert all(param.shape[0] == 4 for param in layer.parameters())
    assert tuple(layer.mlp.experts.gate_up_proj.shape) == (4, 4, 2 * 24, 32)
    assert tuple(layer.mlp.experts.down_proj.shape) == (4, 4, 32, 24)
    assert tuple(layer.mlp.gate.weight.shape) == (4, 4, 32)

    local = copy.deepcopy(layer)
    for param in local.parameters():
        param.data = param.data[2:4].clone()
    tracks = torch.randn(4, 2, 7, 32)
    position_embeddings = model.model.rotary_emb(tracks, torch.arange(7)[None])
    with torch.no_grad():
        full = layer(tracks, position_embeddings=position_embeddings)
        part = local(tracks[2:4], position_embeddings=position_embeddings)
    torch.testing.assert_close(part, full[2:4], atol=ATOL, rtol=0)

    # experts left whole beside sliced routers would silently compute with other tracks' experts: it raises instead
    local.mlp.experts.gate_up_proj.data = layer.mlp.experts.gate_up_proj.data
    with pytest.raises(ValueError, match="experts of 4 tracks but got 2 tracks"):
        local(tracks[2:4], position_embeddings=position_embeddings)


def test_load_balancing_loss_sees_layers_that_offset_each_other():
    """Two sparse layers: the first sends every token to experts 0 and 1, the second to experts 2 and 3. Pooled over
    the layers (Mixtral's function) that looks perfectly balanced; per router it is as unbalanced as top-2 of 4 can
    be. Tokens' logits are one-hot-like so the numbers are known: pooled 2.0 (= k, balanced), per router 4.0."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from modeling_ptt.modeling_parallel_track import pt_load_balancing_loss

    first = torch.tensor([20.0, 20.0, -20.0, -20.0]).expand(1, 64, 4)  # [tracks, tokens, experts]
    second = first.flip(-1)
    pooled = load_balancing_loss_func((first[0], second[0]), 4, 2)
    ours = pt_load_balancing_loss((first, second), num_experts=4, top_k=2)
    torch.testing.assert_close(pooled, torch.tensor(2.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours, torch.tensor(4.0), atol=1e-4, rtol=0)


def test_training_lowers_the_loss_with_the_aux_loss():
    """A few AdamW steps on a fixed batch of random tokens: the loss (cross-entropy + coef * load-balancing loss,
    included whenever labels are given) falls and the routers get gradients."""
    torch.manual_seed(0)
    config = tiny_config(num_tracks=2, router_aux_loss_coef=0.02, **AFM_OPTIONS)
    model = PTForCausalLM(config).train()
    batch = torch.randint(0, config.vocab_size, (8, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = model(batch, labels=batch)
        cross_entropy = model.loss_function(out.logits, batch, config.vocab_size)
        torch.testing.assert_close(out.loss, cross_entropy + config.router_aux_loss_coef * out.aux_loss)
        assert out.router_logits is None  # computed for the loss, returned only when asked for
        out.loss.backward()
        assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def skewed_pt_moe(router_aux_loss_coef: float) -> PTForCausalLM:
    """A two-track PT-MoE whose routers all favour experts 0 and 1: every token's embedding carries one common
    feature, which the routers weigh +3 for experts 0 and 1 and -3 for experts 2 and 3 (every token's top 2)."""
    torch.manual_seed(0)
    model = PTForCausalLM(tiny_config(num_tracks=2, router_aux_loss_coef=router_aux_loss_coef, **AFM_OPTIONS))
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_()
        model.model.embed_tokens.weight[:, 0] = 2.0
        for router in (layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")):
            router.weight.normal_(0.0, 0.5)
            router.weight[:, :2, 0], router.weight[:, 2:, 0] = 3.0, -3.0
    return model.train()


def expert_shares(model: PTForCausalLM, batch: torch.Tensor) -> torch.Tensor:
    """`[sparse layers, tracks, experts]`: each expert's share of its router's top-k choices (balanced: 1 / E)."""
    with torch.no_grad():
        router_logits = model(batch, output_router_logits=True).router_logits
    assert len(router_logits) == model.config.mlp_layer_types.count("sparse")
    chosen = torch.stack(router_logits).topk(model.config.num_experts_per_tok, dim=-1).indices  # [layers, n, N, k]
    counts = torch.nn.functional.one_hot(chosen, model.config.num_experts).sum((2, 3)).float()
    return counts / counts.sum(-1, keepdim=True)


def test_router_gradients_carry_the_load_balancing_loss():
    """The routers' gradients with a positive coefficient differ from those without by exactly coef times the
    gradient of `aux_loss` alone: the load-balancing term reaches the routers (a detached one would not)."""
    model = tiny_model(num_tracks=2, router_aux_loss_coef=0.0, **AFM_OPTIONS).train()
    batch = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    routers = [layer.mlp.gate.weight for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    out = model(batch, labels=batch)
    assert out.aux_loss.requires_grad, "the load-balancing loss is cut off from the routers"
    of_aux_loss = torch.autograd.grad(out.aux_loss, routers, retain_graph=True)
    without = torch.autograd.grad(out.loss, routers)
    model.config.router_aux_loss_coef = 0.3
    with_aux = torch.autograd.grad(model(batch, labels=batch).loss, routers)
    for grad_without, grad_with, grad_aux in zip(without, with_aux, of_aux_loss):
        assert grad_aux.abs().max() > 0.1 * grad_without.abs().max(), (grad_aux.abs().max(), grad_without.abs().max())
        torch.testing.assert_close(grad_with - grad_without, 0.3 * grad_aux, atol=1e-6, rtol=1e-4)


def test_the_load_balancing_loss_evens_out_a_skewed_router():
    """From routers that send every token to experts 0 and 1 (an expert's share 0.5, the most top-2 of 4 allows),
    15 AdamW steps with the load-balancing loss bring every router's largest expert share below 0.375 (balanced:
    0.25); the same steps without it leave some router above that."""
    batch = torch.randint(0, TINY["vocab_size"], (8, 32), generator=torch.Generator().manual_seed(0))
    largest_share = {}
    for coef in (0.0, 0.3):
        model = skewed_pt_moe(router_aux_loss_coef=coef)
        assert expert_shares(model, batch).amax() == 0.5
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(15):
            model(batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        largest_share[coef] = expert_shares(model, batch).amax().item()
    assert largest_share[0.3] < 0.375 < largest_share[0.0], largest_share


def test_afm_pt_moe_parameter_counts():
    """`configuration/afm-pt-moe.json` follows tamm 0.2.0's `AFMParallelTrackMoEConfig` defaults
    (tamm/models/afm_text/afm_pt_moe.py): vocab_size 153600, num_tracks 8, num_layers_per_track 48,
    num_layers_per_track_per_sync_point 4, hidden_dim 2048, num_heads 4 and attention_hidden_dim 512 (4 heads x 128)
    per track, num_kv_heads None (= num_heads: 4 KV heads per track), dense_feed_forward_hidden_dim 5888 per track,
    num_experts 40 per track, num_experts_per_token 2, sparse_feed_forward_hidden_dim 2944, feed-forward pattern
    (dense, sparse), attention pattern (local_rope x 3, global_nope), local_attention_window_size 4096 EXCLUDING the
    current token (transformers' sliding_window counts it: 4097), rope_theta 500000, norm_eps 1e-5, QK-norm with
    per-track weights, tied embedding (TiedWeightLinear), padding_idx 0. Not from tamm: max_position_embeddings."""
    config = PTConfig.from_json_file(ROOT / "configuration" / "afm-pt-moe.json")
    with torch.device("meta"):
        model = PTForCausalLM(config)

    V, d, n, L, hd = 153_600, 2048, 8, 48, 128
    heads, kv_heads, dense_width = 4, 4, 5888  # per track
    E, k, expert_width = 40, 2, 2944
    attention = n * (2 * heads * hd * d + 2 * kv_heads * hd * d)  # q, o; k, v
    norms = n * (2 * d + 2 * hd)  # input / post-attention norms, q / k norms
    dense_ffn = n * 3 * dense_width * d
    router = n * E * d
    experts = n * E * 3 * expert_width * d
    active_experts = n * k * 3 * expert_width * d
    embedding, final_norm = V * d, d  # the LM head is the embedding (tied)
    total = embedding + final_norm + L * (attention + norms) + L // 2 * dense_ffn + L // 2 * (router + experts)
    active = total - L // 2 * (experts - active_experts)
    assert total == 147_803_703_296  # 147.8 B
    assert active == 15_834_122_240  # 15.8 B active per token

    counted = sum(p.numel() for p in model.parameters())
    inactive = sum(
        m.gate_up_proj.numel() + m.down_proj.numel() for m in model.modules() if hasattr(m, "gate_up_proj")
    ) * (E - k) // E
    assert counted == total
    assert counted - inactive == active
    assert config.num_sync_points == 12 and config.num_attention_heads_per_track == 4
    assert config.num_key_value_heads_per_track == 4 and config.intermediate_size_per_track == dense_width


def test_pt_moe_loads_as_remote_code_without_the_package(tmp_path):
    """A saved PT-MoE loads through `AutoModelForCausalLM` with `trust_remote_code` in a process that cannot import
    this package (the modules saved beside the weights are all it has), and computes the same logits."""
    model = tiny_model(num_tracks=2, **AFM_OPTIONS)
    input_ids = torch.randint(0, model.config.vocab_size, (1, 9))
    model.save_pretrained(tmp_path)
    torch.save(input_ids, tmp_path / "input_ids.pt")
    result = run_without_package(
        """
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(".", trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert model.config._experts_implementation == "grouped_mm"
        with torch.no_grad():
            torch.save(model(torch.load("input_ids.pt")).logits, "logits.pt")
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), model(input_ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("fields, named", [
    (dict(num_experts=4, moe_intermediate_size=8, num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(num_experts=0, moe_intermediate_size=8), "num_experts"),
    (dict(mlp_layer_types=["dense", "sparse"]), "num_experts"),
    (dict(num_experts=4), "moe_intermediate_size"),
    (dict(num_experts=4, moe_intermediate_size=8, mlp_layer_types=["sparse"]), "mlp_layer_types"),
    (dict(mlp_layer_types=["dense", "moe"]), "mlp_layer_types"),
    (dict(layer_types=["sliding_attention", "full_attention"]), "sliding_window"),
    (dict(layer_types=["full_attention"] * 3), "layer_types"),
    (dict(layer_types=["full_attention", "local"]), "layer_types"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(no_rope_layers=[1, 2]), "no_rope_layers"),
    (dict(no_rope_layers=[1]), "no_rope_layers"),
    (dict(qk_norm="yes"), "qk_norm"),
    (dict(router_aux_loss_coef=-1.0), "router_aux_loss_coef"),
])
def test_bad_layer_options_raise_naming_the_field(fields, named):
    with pytest.raises(ValueError, match=rf"PTConfig\.{named}="):
        tiny_config(num_hidden_layers=2, **fields)


def test_options_off_leave_the_dense_model_as_it_was():
    """Defaults: full attention with RoPE everywhere, dense FFNs, no QK-norm; the Llama-named weights only and the
    plain causal-LM output."""
    config = PTConfig.from_json_file(ROOT / "configuration" / "ptt-tiny.json")
    assert config.layer_types == ["full_attention"] * 4 and config.no_rope_layers == [1] * 4
    assert config.mlp_layer_types == ["dense"] * 4 and not config.qk_norm and config.sliding_window is None
    model = PTForCausalLM(config).eval()
    per_layer = {"input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                 "mlp.up_proj.weight", "mlp.down_proj.weight"} | {
        f"self_attn.{p}_proj.weight" for p in "qkvo"}
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{name}" for i in range(4) for name in per_layer}
    assert set(model.state_dict()) == expected
    out = model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]]))
    assert type(out) is CausalLMOutputWithPast and out.loss is not None
