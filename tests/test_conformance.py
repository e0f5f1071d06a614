"""PT behaves as transformers' own Llama and Mixtral do: outputs, tuples, recorded attentions and router logits, the
old cache keyword, the merge schedule, dynamic shapes under torch.export and torch.compile, the saved auto_map, and
continuous batching."""

import ast
import json
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from transformers import (
    ContinuousBatchingConfig, DynamicCache, GenerationConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM,
)

from modeling_ptt import PTConfig, PTForCausalLM, PTModel

from helpers import AFM_OPTIONS, llama_config_like, tiny_llama, tiny_model


ATOL = 1e-5  # fp32
SPARSE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)


def llama_with_the_weights_of(model: PTForCausalLM, attn_implementation: str) -> LlamaForCausalLM:
    """transformers' Llama holding a one-track PT model's weights (the track dim of size 1 is all that differs)."""
    config = llama_config_like(model.config)
    config._attn_implementation = attn_implementation
    llama = LlamaForCausalLM(config).eval()
    llama.load_state_dict({name: tensor.squeeze(0) if name.startswith("model.layers.") else tensor
                           for name, tensor in model.state_dict().items()})
    return llama


def assert_same_structure(actual, expected):
    """Equal element by element, through the tuples, caches and None entries of a model output."""
    assert type(actual) is type(expected), (type(actual), type(expected))
    if isinstance(expected, tuple):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same_structure(a, e)
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


# --- return_dict=False ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, AFM_OPTIONS], ids=["dense", "sparse"])
@pytest.mark.parametrize("which", ["base", "causal_lm"])
def test_return_dict_false_gives_the_output_as_a_tuple(which, options, input_ids):
    model = tiny_model(attn_implementation="eager", **options)
    module = model.model if which == "base" else model
    kwargs = dict(output_hidden_states=True, output_attentions=True)
    if which == "causal_lm":
        kwargs["labels"] = input_ids
    with torch.no_grad():
        as_dict = module(input_ids, **kwargs)
        as_tuple = module(input_ids, return_dict=False, **kwargs)
    assert isinstance(as_tuple, tuple)
    assert_same_structure(as_tuple, as_dict.to_tuple())
    assert len(as_tuple) == len([value for value in as_dict.values() if value is not None])


def test_the_tuples_are_llamas(input_ids):
    """Same entries, in the same order, as transformers' Llama with the same weights."""
    model = tiny_model(num_tracks=1, attn_implementation="eager")
    llama = llama_with_the_weights_of(model, "eager")
    kwargs = dict(output_hidden_states=True, output_attentions=True, return_dict=False)
    with torch.no_grad():
        for ours, theirs in ((model.model, llama.model), (model, llama)):
            assert_same_structure(ours(input_ids, **kwargs), theirs(input_ids, **kwargs))
            assert_same_structure(ours(input_ids, labels=input_ids, return_dict=False),
                                  theirs(input_ids, labels=input_ids, return_dict=False))


# --- attentions and hidden states ----------------------------------------------------------------------------------

def test_one_track_hidden_states_and_attentions_equal_llamas(input_ids):
    model = tiny_model(num_tracks=1, attn_implementation="eager")
    llama = llama_with_the_weights_of(model, "eager")
    with torch.no_grad():
        ours = model(input_ids, output_hidden_states=True, output_attentions=True)
        theirs = llama(input_ids, output_hidden_states=True, output_attentions=True)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == model.config.num_hidden_layers + 1
    assert len(ours.attentions) == len(theirs.attentions) == model.config.num_hidden_layers
    for mine, llamas in zip(ours.hidden_states + ours.attentions, theirs.hidden_states + theirs.attentions):
        torch.testing.assert_close(mine, llamas, atol=ATOL, rtol=0)


def test_attentions_hold_every_tracks_heads_in_track_order(input_ids):
    """Layer 0's maps against a per-track computation from the weights: track t's query heads are the heads
    `[t*H/n, (t+1)*H/n)`, each attending to its own track's KV heads."""
    model = tiny_model(attn_implementation="eager")
    config, weights = model.config, model.state_dict()
    with torch.no_grad():
        attentions = model(input_ids, output_attentions=True).attentions
        embedded = model.model.embed_tokens(input_ids)
        position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0)
        cos, sin = model.model.rotary_emb(embedded, position_ids)
    batch, seq_len = input_ids.shape
    heads, kv_heads, hd = config.num_attention_heads_per_track, config.num_key_value_heads_per_track, config.head_dim
    assert len(attentions) == config.num_hidden_layers
    assert all(a.shape == (batch, config.num_attention_heads, seq_len, seq_len) for a in attentions)

    def rotate(x):
        first, second = x.chunk(2, dim=-1)
        return x * cos.unsqueeze(1) + torch.cat((-second, first), dim=-1) * sin.unsqueeze(1)

    causal = torch.full((seq_len, seq_len), float("-inf")).triu(1)
    expected = []
    for t in range(config.num_tracks):
        h = embedded * torch.rsqrt(embedded.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)
        h = h * weights["model.layers.0.input_layernorm.weight"][t]
        q = (h @ weights["model.layers.0.self_attn.q_proj.weight"][t].T).view(batch, seq_len, heads, hd)
        k = (h @ weights["model.layers.0.self_attn.k_proj.weight"][t].T).view(batch, seq_len, kv_heads, hd)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = rotate(q), rotate(k).repeat_interleave(heads // kv_heads, dim=1)
        expected.append(torch.softmax(q @ k.transpose(-1, -2) / hd**0.5 + causal, dim=-1))
    torch.testing.assert_close(attentions[0], torch.cat(expected, dim=1), atol=ATOL, rtol=0)


def test_sdpa_returns_no_attention_weights_as_llama_does(input_ids):
    model = tiny_model(num_tracks=1, attn_implementation="sdpa")
    llama = llama_with_the_weights_of(model, "sdpa")
    with torch.no_grad():
        ours = model(input_ids, output_attentions=True).attentions
        theirs = llama(input_ids, output_attentions=True).attentions
    assert ours == theirs


def test_gradients_reach_the_returned_hidden_state_and_attention_map(input_ids):
    model = tiny_model(attn_implementation="eager").train()
    output = model(input_ids, output_hidden_states=True, output_attentions=True)
    first_state, first_map = output.hidden_states[0], output.attentions[0]
    first_state.retain_grad()
    first_map.retain_grad()
    output.logits.sum().backward()
    assert first_state.grad is not None and first_state.grad.abs().sum() > 0
    assert first_map.grad is not None and first_map.grad.abs().sum() > 0


# --- router logits -------------------------------------------------------------------------------------------------

def mixtral_with_the_weights_of(model: PTForCausalLM) -> MixtralForCausalLM:
    config = model.config
    mixtral = MixtralForCausalLM(MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.moe_intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=config.rope_parameters, sliding_window=None, num_local_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok, router_aux_loss_coef=config.router_aux_loss_coef,
    )).eval()
    mixtral.load_state_dict({name: tensor.squeeze(0) if name.startswith("model.layers.") else tensor
                             for name, tensor in model.state_dict().items()})
    return mixtral


def test_one_track_moe_equals_mixtral_with_its_router_logits(input_ids):
    model = tiny_model(num_tracks=1, **SPARSE)
    mixtral = mixtral_with_the_weights_of(model)
    with torch.no_grad():
        ours = model(input_ids, output_router_logits=True)
        theirs = mixtral(input_ids, output_router_logits=True)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=ATOL, rtol=0)
    assert len(ours.router_logits) == len(theirs.router_logits) == model.config.num_hidden_layers
    for mine, mixtrals in zip(ours.router_logits, theirs.router_logits):
        torch.testing.assert_close(mine.squeeze(0), mixtrals, atol=ATOL, rtol=0)  # [1 track, N, E] vs [N, E]
    # one track and one router per layer: PT's per-router loss is Mixtral's pooled one up to the averaging
    assert ours.aux_loss is not None and torch.isfinite(ours.aux_loss)


def test_router_logits_and_attentions_are_recorded_as_mixtrals_are():
    """Declared per class for transformers' own recorder, as Mixtral and Qwen3-MoE declare them."""
    assert set(PTModel._can_record_outputs) == {"router_logits", "attentions"}
    assert set(MixtralForCausalLM._can_record_outputs) >= set(PTModel._can_record_outputs)


@pytest.mark.parametrize("by", ["call", "config"])
def test_a_dense_model_asked_for_router_logits_returns_none_of_them(by, input_ids):
    model = tiny_model(**({"output_router_logits": True} if by == "config" else {}))
    kwargs = {"output_router_logits": True} if by == "call" else {}
    with torch.no_grad():
        assert model(input_ids, **kwargs).router_logits == ()
        assert model.model(input_ids, **kwargs).router_logits == ()
    with torch.no_grad():  # not asked: Llama's output type, as before
        assert type(tiny_model()(input_ids)).__name__ == "CausalLMOutputWithPast"


# --- the old cache keyword -----------------------------------------------------------------------------------------

def cache_keyword_warnings(module, input_ids) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            module(input_ids, past_key_values=DynamicCache(config=module.config), use_cache=True)
    return [str(w.message) for w in caught
            if issubclass(w.category, FutureWarning) and "past_key_values" in str(w.message)]


def test_the_old_cache_keyword_warns_exactly_where_llamas_does(input_ids):
    model = tiny_model(num_tracks=1)
    llama = llama_with_the_weights_of(model, "sdpa")
    for ours, theirs in ((model, llama), (model.model, llama.model)):
        expected = [message.replace(type(theirs).__name__, type(ours).__name__)
                    for message in cache_keyword_warnings(theirs, input_ids)]
        assert cache_keyword_warnings(ours, input_ids) == expected


def test_generate_passes_the_cache_without_a_warning(input_ids):
    model = tiny_model()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*", category=FutureWarning)
        model.generate(input_ids, max_new_tokens=3, do_sample=False)
        model.generate(input_ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
        model.generate(input_ids, max_new_tokens=3, num_beams=2, do_sample=False)


# --- the merge schedule --------------------------------------------------------------------------------------------

def test_the_track_blocks_are_computed_once_from_the_config():
    model = tiny_model()  # 5 layers, D=2
    assert model.model.track_blocks == (range(0, 2), range(2, 4), range(4, 5))
    assert model.model.track_blocks is model.model.track_blocks  # an attribute, not rebuilt per access
    tensor_parallel = tiny_model(sync_mode="tensor_parallel")
    assert tensor_parallel.model.track_blocks == tuple(range(i, i + 1) for i in range(5))


@pytest.mark.parametrize("depth, mode", [(1, "track_block"), (3, "track_block"), (2, "tensor_parallel")])
def test_set_sync_schedule_equals_a_model_built_with_that_schedule(depth, mode, input_ids):
    changed = tiny_model(seed=4)
    built = tiny_model(seed=4, track_block_depth=depth, sync_mode=mode)
    changed.set_sync_schedule(track_block_depth=depth, sync_mode=mode)
    assert (changed.config.track_block_depth, changed.config.sync_mode) == (depth, mode)
    assert changed.model.track_blocks == built.model.track_blocks
    with torch.no_grad():
        torch.testing.assert_close(changed(input_ids).logits, built(input_ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("field, value", [("track_block_depth", 1), ("sync_mode", "tensor_parallel")])
def test_assigning_the_schedule_on_a_built_model_raises(field, value, input_ids):
    model = tiny_model()
    setattr(model.config, field, value)
    with pytest.raises(ValueError, match=f"{field}=.*set_sync_schedule"):
        model(input_ids)


@pytest.mark.parametrize("kwargs, field", [({"track_block_depth": 0}, "track_block_depth"),
                                           ({"sync_mode": "ring"}, "sync_mode")])
def test_set_sync_schedule_refuses_a_schedule_that_cannot_work(kwargs, field, input_ids):
    model = tiny_model()
    with pytest.raises(ValueError, match=f"PTConfig.{field}="):
        model.set_sync_schedule(**kwargs)
    assert (model.config.track_block_depth, model.config.sync_mode) == (2, "track_block")  # left as it was
    model(input_ids)


# --- dynamic shapes under torch.export and torch.compile ----------------------------------------------------------

@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
def test_a_dynamic_export_runs_every_shape_from_one_token_up_as_llamas_does(strict):
    """Exported from `[2, 16]` with dynamic batch and sequence, the program runs from one token to its maximum and
    equals the eager model (fp32, atol 1e-5): no CPU kernel choice by row count is kept as a guard on the shape."""
    model = tiny_model()
    example = torch.randint(3, model.config.vocab_size, (2, 16))
    dims = {0: torch.export.Dim("batch", min=1, max=4), 1: torch.export.Dim("sequence", min=1, max=128)}
    exported = torch.export.export(model, (), {"input_ids": example, "use_cache": False},
                                   dynamic_shapes={"input_ids": dims, "use_cache": None}, strict=strict).module()
    for shape in [(1, 1), (1, 4), (2, 3), (4, 128)]:
        input_ids = torch.randint(3, model.config.vocab_size, shape)
        with torch.no_grad():
            expected = model(input_ids, use_cache=False).logits
        torch.testing.assert_close(exported(input_ids=input_ids, use_cache=False).logits, expected, atol=ATOL, rtol=0)


def dynamic_compiles(model, shapes: list[tuple[int, int]]) -> int:
    """How many graphs `torch.compile(dynamic=True)` builds for a run of inputs of `shapes` (outputs checked)."""
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    for shape in shapes:
        input_ids = torch.randint(3, model.config.vocab_size, shape)
        with torch.no_grad():
            torch.testing.assert_close(compiled(input_ids).logits, model(input_ids).logits, atol=ATOL, rtol=0)
    return counter.frame_count


def test_dynamic_compile_recompiles_only_where_llamas_does():
    """`dynamic=True` still specializes a dim of size 1, so both build a second graph for batch 1; inputs of a few
    tokens, where eager CPU decoding switches kernels, reuse the graph of longer ones as Llama's do."""
    shapes = [(2, 16), (2, 2), (1, 4), (1, 40)]
    assert dynamic_compiles(tiny_model(num_hidden_layers=2), shapes) == dynamic_compiles(
        tiny_llama(num_hidden_layers=2), shapes)


# --- auto_map ------------------------------------------------------------------------------------------------------

FULL_AUTO_MAP = {
    "AutoConfig": "configuration_ptt.PTConfig",
    "AutoModel": "modeling_parallel_track.PTModel",
    "AutoModelForCausalLM": "modeling_parallel_track.PTForCausalLM",
}


def test_auto_map_is_written_by_a_save_and_nowhere_else(tmp_path):
    config = PTConfig(**{**tiny_model().config.to_dict(), "auto_map": None})
    assert getattr(PTConfig(), "auto_map", None) is None
    config.save_pretrained(tmp_path / "config")
    assert json.loads((tmp_path / "config" / "config.json").read_text())["auto_map"] == FULL_AUTO_MAP
    PTModel(PTConfig(num_tracks=1, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=11)).save_pretrained(tmp_path / "base")
    assert json.loads((tmp_path / "base" / "config.json").read_text())["auto_map"] == FULL_AUTO_MAP
    assert getattr(PTConfig.from_pretrained(tmp_path / "base"), "auto_map", None) == FULL_AUTO_MAP


def test_the_saved_remote_code_is_model_code_only(tmp_path):
    """No measuring tool and no private or testing torch module travels with a saved model."""
    tiny_model().save_pretrained(tmp_path)
    for path in sorted(tmp_path.glob("*.py")):
        tree = ast.parse(path.read_text())
        names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        names += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
        for name in names:
            parts = name.split(".")
            assert not (parts[0] == "torch" and ("testing" in parts or any(p.startswith("_") for p in parts))), (
                path.name, name)
        assert "CollectiveCounter" not in path.read_text(), path.name


# --- continuous batching -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, AFM_OPTIONS], ids=["dense", "afm"])
def test_generate_batch_equals_every_requests_solo_generate(options):
    model = tiny_model(seed=3, **options)
    prompts = [[5, 9, 11], [7, 3, 8, 20, 31, 4, 2, 17], [1, 2]]
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)
    # a cache sized for these requests: unsized, the paged cache takes a share of the free memory
    sizes = ContinuousBatchingConfig(num_blocks=8, max_batch_tokens=32)
    outputs = model.generate_batch(prompts, generation_config=config, continuous_batching_config=sizes)
    assert len(outputs) == len(prompts)
    for output in outputs.values():
        solo = model.generate(torch.tensor([output.prompt_ids]), max_new_tokens=6, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert list(output.generated_tokens) == solo[0, len(output.prompt_ids):].tolist(), output.prompt_ids
