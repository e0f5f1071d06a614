"""The Parallel Track (PT) Transformer (Wang et al., arXiv:2602.07306) as a `transformers` model.

A PT model runs `num_tracks` narrow transformers side by side. Each track carries the full residual stream, owns
`1/num_tracks` of the attention heads and FFN width, and runs `track_block_depth` layers on its own before all
tracks are merged by the mean of their residual streams:

    hidden = embed(input_ids)
    for each block of D layers:
        tracks = dispatch(hidden)            # [n_local, B, S, d], every track starts from the merged state
        for layer in block:
            tracks = layer(tracks)           # batched over tracks: one bmm per projection, one attention call
        hidden = merge(tracks)               # mean over tracks; with tracks on several ranks ONE all_reduce
    logits = lm_head(norm(hidden))

Weights are stacked with the track as dim 0 (`q_proj.weight` is `[n, H/n * head_dim, d]`), so on one device all
tracks of a layer are a single batched matmul, and a rank that owns tracks `[a, b)` holds the slice `[a:b]`.
The one-device and the distributed forward are the same code: only `PTTrackSync.merge` adds an all_reduce.

The options of Apple's AFM 2025 PT-MoE keep that shape: QK-norm and sliding-window / NoPE attention change a layer's
attention only, and a sparse layer's experts belong to one track each (`gate_up_proj` is `[n, E, 2I, d]`), so a
token never leaves its track and the merge stays the only communication.
"""

import inspect
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.generation.continuous_batching import PagedAttentionCache
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaForCausalLM,
    LlamaModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_ptt import MODEL_MODULE, PTConfig, check_sync_schedule
from .conversion_ptt import (
    llama_config_from_pt,
    llama_state_dict_to_tracks,
    pt_config_from_llama,
    tracks_state_dict_to_llama,
)
from .distributed_ptt import (
    HUB_KWARGS,
    DispatchToRanks,
    MergeAcrossRanks,
    check_safetensors_checkpoint,
    load_track_parallel,
    track_parallel_size,
)
from .quantization_ptt import check_quantization_method, quantize_track_weights


logger = logging.get_logger(__name__)

# transformers 5.x renamed the cache from `past_key_values` to `cache` (outputs and forward kwargs); speak both.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
# The keyword the installed version's own models (and so its generate()) pass the cache by, and the version in which
# they announce the removal of the old one.
CACHE_KEYWORD = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
OLD_CACHE_KEYWORD_REMOVAL = "5.40.0"
# Continuous batching's paged cache: where its update takes the attention kwargs, the attention module updates it, as
# Llama's does; before that, the paged attention functions update it and find it in the kwargs.
PAGED_CACHE_TAKES_KWARGS = "kwargs" in inspect.signature(PagedAttentionCache.update).parameters
# transformers' own mask for each attention layer type of `config.layer_types`
MASK_FUNCTIONS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
# CPU kernel choices. CPU BLAS streams a weight at memory speed only as the left factor of column-major tokens, so an
# eager projection of this many rows per track or fewer (decoding) runs as `W @ x^T` rather than `x @ W^T`. A traced
# forward never chooses by its row count (see `is_traced`): the choice would become a guard on the input's shape.
CPU_DECODE_MAX_ROWS = 4
# From this many rows on, every matmul form runs alike: an expert skips the transposing copies of the decoding form.
CPU_EXPERT_PLAIN_MIN_ROWS = 16
# What a track weight is unless a quantizer replaced it (see quantization_ptt)
PLAIN_TENSOR_TYPES = (nn.Parameter, torch.Tensor)


def deprecate_old_cache_keyword(forward: Callable) -> Callable:
    """Warn, as transformers' own models do, when a caller passes `past_key_values` to a version whose models take
    `cache` (its generate() passes `cache`, so generation stays silent); older versions pass `past_key_values`."""
    if CACHE_KEYWORD != "cache":
        return forward
    return deprecate_kwarg("past_key_values", OLD_CACHE_KEYWORD_REMOVAL, new_name="cache")(forward)


def is_traced() -> bool:
    """Whether the forward is being recorded into a graph rather than run: torch.compile, and strict and non-strict
    torch.export (and so the ONNX and ExecuTorch exporters built on it) set `is_compiling`; torch.jit.trace (the
    TorchScript ONNX exporter) sets `is_tracing`. A graph keeps a branch taken on a shape: as a guard that refuses
    (export) or recompiles for (compile) the inputs on its other side, or (jit.trace) for every input."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def cpu_decode_linear(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`flat @ weight^T + bias` over tracks (`[n, m, in] -> [n, m, out]`) computed as `weight @ flat^T`: the form in
    which CPU BLAS streams the weight at memory speed when `m` is a few decoding rows."""
    out = torch.bmm(weight, flat.transpose(1, 2)).transpose(1, 2).contiguous()
    if bias is not None:
        out += bias.unsqueeze(1)
    return out


def add_residual_(sublayer_output: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """`sublayer_output + residual`, written into the sublayer's fresh output: the tracks make the elementwise work
    `n` times the dense model's, and on CPU a fresh `[n, B, S, d]` buffer per op costs as much as the op."""
    return sublayer_output.add_(residual)


class PTTrackLinear(nn.Module):
    """One linear map per track, applied to all tracks as one batched matmul: `[n, ..., in] -> [n, ..., out]`."""

    def __init__(self, num_tracks: int, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(num_tracks, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_tracks, out_features)) if bias else None

    def forward(self, tracks: torch.Tensor) -> torch.Tensor:
        flat = tracks.reshape(tracks.shape[0], -1, self.in_features)
        if type(self.weight) not in PLAIN_TENSOR_TYPES:
            # a quantizer's tensor subclass (torchao's): it computes a linear map of one 2-D slice, not a bmm
            out = torch.stack([
                nn.functional.linear(rows, self.weight[track], None if self.bias is None else self.bias[track])
                for track, rows in enumerate(flat)
            ])
        elif flat.device.type == "cpu" and not is_traced() and flat.shape[1] <= CPU_DECODE_MAX_ROWS:
            out = cpu_decode_linear(flat, self.weight, self.bias)
        elif self.bias is None:
            out = torch.bmm(flat, self.weight.transpose(1, 2))
        else:
            out = torch.baddbmm(self.bias.unsqueeze(1), flat, self.weight.transpose(1, 2))
        return out.view(*tracks.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        tracks, bias = self.weight.shape[0], self.bias is not None
        return f"tracks={tracks}, in={self.in_features}, out={self.out_features}, bias={bias}"


class PTRMSNorm(nn.Module):
    """RMSNorm with its own weight vector per track: `weight` is `[n, d]`, input `[n, B, S, d]`."""

    def __init__(self, num_tracks: int, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_tracks, hidden_size))
        self.variance_epsilon = eps

    def forward(self, tracks: torch.Tensor) -> torch.Tensor:
        input_dtype = tracks.dtype
        tracks = tracks.to(torch.float32)
        variance = tracks.pow(2).mean(-1, keepdim=True)
        normalized = (tracks * torch.rsqrt(variance + self.variance_epsilon)).to(input_dtype)
        weight = self.weight.view(self.weight.shape[0], *([1] * (tracks.dim() - 2)), -1)
        return normalized.mul_(weight)  # in place into the fresh `normalized`, as `add_residual_`

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class PTTrackSync(nn.Module):
    """Dispatch the merged residual stream to the local tracks, and merge the tracks back by their mean.

    On one device the mean is a sum over the track dim divided by `num_tracks`. When the tracks are spread over the
    ranks of `process_group`, every rank sums its local tracks and ONE all_reduce adds the partial sums: this is the
    only communication of the whole forward. In training, merge and dispatch are Megatron's conjugate g and f
    (`MergeAcrossRanks`, `DispatchToRanks`): the backward adds one all_reduce per dispatch, none per merge.
    """

    def __init__(self, num_tracks: int):
        super().__init__()
        self.num_tracks = num_tracks
        self.num_local_tracks = num_tracks
        self.process_group: dist.ProcessGroup | None = None

    def dispatch(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.process_group is not None and torch.is_grad_enabled() and hidden_states.requires_grad:
            # free forward; the backward adds the other ranks' tracks' gradients (one all_reduce)
            hidden_states = DispatchToRanks.apply(hidden_states, self.process_group)
        return hidden_states.unsqueeze(0).expand(self.num_local_tracks, *hidden_states.shape)

    def merge(self, tracks: torch.Tensor) -> torch.Tensor:
        merged = tracks.sum(0)
        if self.process_group is not None:
            merged = self.sum_over_ranks(merged)
        return merged / self.num_tracks

    def mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks of a per-rank mean over its local tracks (e.g. PT-MoE's load-balancing loss):
        every rank holds as many tracks, so that is the mean over all tracks. Its gradient reaches each rank's
        tracks once, as a merge's does."""
        if self.process_group is None:
            return value
        return self.sum_over_ranks(value.clone()) * (self.num_local_tracks / self.num_tracks)

    def sum_over_ranks(self, fresh: torch.Tensor) -> torch.Tensor:
        """`fresh` (a tensor of its own: it is reduced in place) summed over the ranks by one all_reduce. When it
        carries gradients, the backward is free: everything after the sum is replicated on every rank."""
        if torch.is_grad_enabled() and fresh.requires_grad:
            return MergeAcrossRanks.apply(fresh, self.process_group)
        dist.all_reduce(fresh, group=self.process_group)
        return fresh

    def extra_repr(self) -> str:
        return f"num_tracks={self.num_tracks}, num_local_tracks={self.num_local_tracks}"


class PTMLP(nn.Module):
    """SwiGLU FFN of every track; a track's FFN width is `intermediate_size / num_tracks`."""

    def __init__(self, config: PTConfig):
        super().__init__()
        n, d, width = config.num_tracks, config.hidden_size, config.intermediate_size_per_track
        self.gate_proj = PTTrackLinear(n, d, width, bias=config.mlp_bias)
        self.up_proj = PTTrackLinear(n, d, width, bias=config.mlp_bias)
        self.down_proj = PTTrackLinear(n, width, d, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, tracks: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(tracks)) * self.up_proj(tracks))


class PTTopKRouter(PTTrackLinear):
    """Every track's router over its own `num_experts` experts (`weight` is `[n, E, d]`): softmax, then top-k."""

    def __init__(self, config: PTConfig):
        super().__init__(config.num_tracks, config.hidden_size, config.num_experts)
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob

    def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`[n, N, d]` -> router logits `[n, N, E]`, top-k weights and top-k expert indices `[n, N, k]`."""
        router_logits = super().forward(rows)
        router_probs = nn.functional.softmax(router_logits, dim=-1, dtype=torch.float)
        top_k_weights, top_k_index = torch.topk(router_probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return router_logits, top_k_weights.to(router_logits.dtype), top_k_index


@use_experts_implementation
class PTFoldedExperts:
    """All tracks' experts as ONE expert dim of `n*E` (views of `PTExperts`' weights), in the 3D layout of
    transformers' experts interface, which runs them as one grouped matmul (`config._experts_implementation`:
    `grouped_mm` by default, `batched_mm`, ...). `forward` below is the `"eager"` kernel, the one for CPU: the token
    slots sorted by expert, one pair of matmuls per expert that has any (`expert_forward`)."""

    def __init__(self, config: PTConfig, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, act_fn: Callable):
        self.num_experts = gate_up_proj.shape[0]
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        self.act_fn = act_fn

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        num_tokens, top_k = top_k_index.shape
        chosen_experts = top_k_index.flatten()
        slots_by_expert = chosen_experts.argsort(stable=True)
        tokens_by_expert = slots_by_expert // top_k
        slots_per_expert = torch.bincount(chosen_experts, minlength=self.num_experts).tolist()  # one host sync
        inputs = hidden_states[tokens_by_expert]
        by_slot = torch.empty_like(inputs)
        start = 0
        for expert, count in enumerate(slots_per_expert):
            if count:
                # narrow, not split: autograd lets a single view be written in place
                self.expert_forward(expert, inputs.narrow(0, start, count), by_slot.narrow(0, start, count))
                start += count
        by_slot.mul_(top_k_weights.flatten()[slots_by_expert, None].to(by_slot.dtype))
        # one fresh buffer where unsorting and summing the k slots would take two (see `add_residual_`)
        return torch.zeros_like(hidden_states).index_add_(0, tokens_by_expert, by_slot)

    def expert_forward(self, expert: int, rows: torch.Tensor, out: torch.Tensor) -> None:
        """One expert's SwiGLU of its `rows` `[m, d]` into `out` `[m, d]`, in the CPU kernel's matmul forms: each weight
        is the left factor of column-major tokens (see `CPU_DECODE_MAX_ROWS`), and a single row is doubled because
        CPU BLAS runs one column as a slow single-threaded matrix-vector product."""
        columns = (rows if len(rows) > 1 else torch.cat([rows, rows])).T
        gate, up = torch.mm(self.gate_up_proj[expert], columns).chunk(2)
        activations = self.act_fn(gate) * up  # [I, columns]
        if len(rows) >= CPU_EXPERT_PLAIN_MIN_ROWS:
            out.copy_(torch.mm(activations.T, self.down_proj[expert].T))
        else:
            out.copy_(torch.mm(self.down_proj[expert], activations.T.contiguous().T).T[: len(rows)])


class PTExperts(nn.Module):
    """`num_experts` SwiGLU experts per track, in Mixtral's layout with the track first: `gate_up_proj` is
    `[n, E, 2I, d]` (gate rows, then up rows), `down_proj` is `[n, E, d, I]`."""

    def __init__(self, config: PTConfig):
        super().__init__()
        n, d, width = config.num_tracks, config.hidden_size, config.moe_intermediate_size
        self.config = config
        self.gate_up_proj = nn.Parameter(torch.empty(n, config.num_experts, 2 * width, d))
        self.down_proj = nn.Parameter(torch.empty(n, config.num_experts, d, width))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, rows: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """`rows` `[n, N, d]`, the top-k of each track's router `[n, N, k]` -> `[n, N, d]`."""
        num_tracks, num_experts = self.gate_up_proj.shape[:2]
        if rows.shape[0] != num_tracks:  # e.g. a rank that holds only its tracks' rows but every track's experts
            raise ValueError(f"PTExperts holds the experts of {num_tracks} tracks but got {rows.shape[0]} tracks")
        # Expert e of track t becomes expert t*E + e of the folded dim; a track's tokens only ever pick its own.
        track_offset = torch.arange(num_tracks, device=top_k_index.device).view(-1, 1, 1) * num_experts
        experts = PTFoldedExperts(
            self.config, self.gate_up_proj.flatten(0, 1), self.down_proj.flatten(0, 1), self.act_fn
        )
        output = experts.forward(
            rows.flatten(0, 1), (top_k_index + track_offset).flatten(0, 1), top_k_weights.flatten(0, 1)
        )
        return output.view_as(rows)


class PTSparseMoeBlock(nn.Module):
    """Per-track mixture of experts: every track routes its tokens to `num_experts_per_tok` of its OWN experts."""

    def __init__(self, config: PTConfig):
        super().__init__()
        self.gate = PTTopKRouter(config)
        self.experts = PTExperts(config)

    def forward(self, tracks: torch.Tensor) -> torch.Tensor:
        rows = tracks.reshape(tracks.shape[0], -1, tracks.shape[-1])
        _, top_k_weights, top_k_index = self.gate(rows)
        return self.experts(rows, top_k_index, top_k_weights).view_as(tracks)


def pt_load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mixtral's load-balancing loss (Switch Transformer eqs. 4-6) of every router on its own, i.e. of every sparse
    layer's routing within every track, averaged (balanced routing gives `top_k`, as Mixtral's does).

    Mixtral pools the logits of all layers first, so an expert that one layer overloads and another starves counts as
    balanced (transformers#28255): trained that way, a PT-MoE's experts stayed uneven per layer while the pooled
    loss sat at its minimum. With one sparse layer and one track both are the same number.

    `router_logits` holds one `[n, batch * seq_len, num_experts]` tensor per sparse layer; `attention_mask` is the 2D
    padding mask (its last `seq_len` columns are used, so it may also cover cached tokens).
    """
    if attention_mask is not None:
        attention_mask = attention_mask[:, -(router_logits[0].shape[1] // attention_mask.shape[0]) :]
    per_router = [
        load_balancing_loss_func((track_logits,), num_experts, top_k, attention_mask)
        for layer_logits in router_logits
        for track_logits in layer_logits
    ]
    return torch.stack(per_router).mean()


class PTAttention(nn.Module):
    """Causal GQA self-attention of all local tracks in ONE call of the configured attention function.

    Track `t` owns query heads `[t*H/n, (t+1)*H/n)` and KV heads `[t*K/n, (t+1)*K/n)`. Folding the track dim into the
    head dim therefore yields the usual `[B, heads, S, head_dim]` layout in which the standard GQA mapping (query head
    `h` reads KV head `h // (H/K)`) never crosses a track, and the KV cache holds the local tracks' KV heads.
    """

    def __init__(self, config: PTConfig, layer_idx: int):
        super().__init__()
        n, d, bias = config.num_tracks, config.hidden_size, config.attention_bias
        self.head_dim = config.head_dim
        q_width = config.num_attention_heads_per_track * self.head_dim
        kv_width = config.num_key_value_heads_per_track * self.head_dim
        self.q_proj = PTTrackLinear(n, d, q_width, bias=bias)
        self.k_proj = PTTrackLinear(n, d, kv_width, bias=bias)
        self.v_proj = PTTrackLinear(n, d, kv_width, bias=bias)
        self.o_proj = PTTrackLinear(n, q_width, d, bias=bias)
        # QK-norm (Qwen3, AFM): RMSNorm of every query and key head over the head dim, weights per track
        self.q_norm = PTRMSNorm(n, self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = PTRMSNorm(n, self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.config = config
        self.layer_idx = layer_idx
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        self.use_rope = bool(config.no_rope_layers[layer_idx])


    def forward(
        self,
        tracks: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        num_tracks, batch, seq_len, _ = tracks.shape

        def tracks_to_heads(states: torch.Tensor, norm: PTRMSNorm | None = None) -> torch.Tensor:
            states = states.view(num_tracks, batch, seq_len, -1, self.head_dim)  # [n, B, S, h*hd] -> [n, B, S, h, hd]
            if norm is not None:
                states = norm(states)
            return states.permute(1, 0, 3, 2, 4).flatten(1, 2)  # -> [B, n*h, S, hd]

        query = tracks_to_heads(self.q_proj(tracks), self.q_norm)
        key = tracks_to_heads(self.k_proj(tracks), self.k_norm)
        value = tracks_to_heads(self.v_proj(tracks))

        if self.use_rope:  # NoPE layers attend without any position encoding
            cos, sin = position_embeddings
            query, key = apply_rotary_pos_emb(query, key, cos, sin)

        if isinstance(cache, PagedAttentionCache) and not PAGED_CACHE_TAKES_KWARGS:
            kwargs["cache"] = cache
        elif cache is not None:  # the kwargs carry what a paged cache reads and fills
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,  # for kernels that take the window as an argument (flash)
            **kwargs,
        )
        # [B, S, n*h, hd] -> [n, B, S, h*hd]
        attn_output = attn_output.reshape(batch, seq_len, num_tracks, -1).permute(2, 0, 1, 3)
        return self.o_proj(attn_output), attn_weights


class PTDecoderLayer(GradientCheckpointingLayer):
    """Layer `l` of every track: pre-norm attention and pre-norm FFN (dense SwiGLU or the track's own experts), each
    with a residual add."""

    def __init__(self, config: PTConfig, layer_idx: int):
        super().__init__()
        self.attention_type = config.layer_types[layer_idx]
        self.self_attn = PTAttention(config, layer_idx)
        self.mlp = PTSparseMoeBlock(config) if config.mlp_layer_types[layer_idx] == "sparse" else PTMLP(config)
        self.input_layernorm = PTRMSNorm(config.num_tracks, config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = PTRMSNorm(config.num_tracks, config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        tracks: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        sublayer_sync: PTTrackSync | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """`sublayer_sync` (tensor-parallel mode) also merges the tracks between attention and FFN."""
        attn_output, _ = self.self_attn(
            self.input_layernorm(tracks),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        tracks = add_residual_(attn_output, tracks)
        if sublayer_sync is not None:
            tracks = sublayer_sync.dispatch(sublayer_sync.merge(tracks))
        return add_residual_(self.mlp(self.post_attention_layernorm(tracks)), tracks)


# --- input checks: a clear ValueError naming the argument instead of an IndexError, a reshape error or a CUDA
# device-side assert deep inside the forward, or (for a mask that does not fit) a silently wrong answer. Shapes are
# checked on every call, for free. Token ids are read only where that costs one host sync per prompt, not per token:
# at generate()'s entry and on a forward with an empty cache (prefill), never while torch.compile traces. A training
# forward reads them only from host memory (no sync); on an accelerator a read would stall every step, so training
# loops check each batch with `check_batch` while it is still on the CPU.
# Every rank of a track-parallel model holds the same inputs, so every rank raises the same error.


def cached_length(cache: Cache | None) -> int | None:
    """How many tokens `cache` holds, when the host knows it without a device sync (None otherwise: a static cache
    counts on the device once it is filled, continuous batching's paged cache counts per sequence)."""
    if cache is None:
        return 0
    if torch.compiler.is_compiling() or not isinstance(cache, Cache):
        return None
    length = cache.get_seq_length()
    return length if isinstance(length, int) else None


def reads_token_ids(module: nn.Module, ids: torch.Tensor | None) -> bool:
    """Whether `module`'s forward reads the values of `ids`: not in training (grad enabled) on an accelerator, where
    the read is a host sync that stalls every step; tensors in host memory are read without one."""
    return ids is not None and not (module.training and torch.is_grad_enabled() and ids.device.type != "cpu")


def check_token_ids(name: str, ids: torch.Tensor, vocab_size: int, ignore_index: int | None = None,
                    read_values: bool = True) -> None:
    """Every id of `ids` in `[0, vocab_size)` (or `ignore_index`), one host sync; only the dtype without
    `read_values`."""
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name} has dtype {ids.dtype}: token ids are integers (torch.long)")
    if not read_values or torch.compiler.is_compiling() or ids.numel() == 0:
        return
    valid = ids if ignore_index is None else ids.masked_fill(ids == ignore_index, 0)
    low, high = torch.stack(valid.aminmax()).tolist()
    if low < 0 or high >= vocab_size:
        position = tuple(((valid < 0) | (valid >= vocab_size)).nonzero()[0].tolist())
        allowed = f"[0, vocab_size={vocab_size})" + ("" if ignore_index is None else f" or {ignore_index} (ignored)")
        raise ValueError(f"{name} holds token id {ids[position].item()} at position {position}: ids must be in "
                         f"{allowed}")


def check_inputs(
    config: PTConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | dict | None,
    cache: Cache | None,
    read_ids: bool = True,
) -> None:
    """The forward's inputs (exactly one of `input_ids`, `inputs_embeds`); `cache` holds what came before them.
    Without `read_ids` the values of `input_ids` are not read (see `reads_token_ids`).

    A 2-D `attention_mask` is the padding mask of the cached tokens followed by the new ones: `(batch, cached + new)`.
    The prepared forms transformers itself passes (4-D masks, a dict per layer type) are its own business.
    """
    name, tokens = ("input_ids", input_ids) if input_ids is not None else ("inputs_embeds", inputs_embeds)
    if input_ids is not None and input_ids.dim() != 2:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}, expected (batch, sequence_length)")
    if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size):
        raise ValueError(f"inputs_embeds has shape {tuple(inputs_embeds.shape)}, expected (batch, sequence_length, "
                         f"hidden_size={config.hidden_size})")
    batch, length = tokens.shape[:2]
    if length == 0:
        raise ValueError(f"{name} has shape {tuple(tokens.shape)}: every sequence needs at least one token (an empty "
                         "prompt gives the model nothing to predict from; start it with the BOS token)")
    past = cached_length(cache)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        expected_length = length + past if past is not None else attention_mask.shape[1]
        if attention_mask.shape != (batch, expected_length):
            cached = f"{past} cached + {length} new" if past else f"{length}"
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({batch}, "
                             f"{expected_length}): one row per sequence of {name} {tuple(tokens.shape)} and one "
                             f"column per token ({cached})")
    if input_ids is not None and past == 0:  # prefill or training; decoding steps were checked at their prefill
        check_token_ids("input_ids", input_ids, config.vocab_size, read_values=read_ids)


def check_labels(labels: torch.Tensor | None, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                 vocab_size: int, read_values: bool = True) -> None:
    """One target per input token (the loss shifts them itself), each a token id or -100 (ignored); the ids only with
    `read_values`."""
    if labels is None:
        return
    tokens = input_ids if input_ids is not None else inputs_embeds
    if tokens is not None and tuple(labels.shape) != tuple(tokens.shape[:2]):
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {tuple(tokens.shape[:2])}, the (batch, "
                         f"sequence_length) of {name}: one target per input token (the loss shifts them)")
    check_token_ids("labels", labels, vocab_size, ignore_index=-100, read_values=read_values)


def check_batch(config: PTConfig, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    """A training batch's token ids and labels, with the forward's errors: call it once per batch while the batch is
    still on the CPU (a training forward on an accelerator reads no values: that host sync would stall every step)."""
    check_inputs(config, input_ids, None, None, None)
    check_labels(labels, input_ids, None, config.vocab_size)


def check_generate_inputs(config: PTConfig, generation_config, args: tuple, kwargs: dict) -> None:
    """`generate()`'s prompt, once: what `check_inputs` checks (a 2-D mask covers the whole prompt, including what a
    passed cache holds), and a warning (once per length) when the prompt plus `max_new_tokens` passes
    `max_position_embeddings`."""
    input_ids = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
    inputs_embeds = kwargs.get("inputs_embeds")
    if input_ids is not None and not isinstance(input_ids, torch.Tensor):
        return  # transformers explains what it accepts
    if inputs_embeds is not None:  # generate() may be given both: the ids then only prefix the output
        check_inputs(config, None, inputs_embeds, kwargs.get("attention_mask"), None)
        if input_ids is not None and input_ids.numel():
            check_token_ids("input_ids", input_ids, config.vocab_size)
    elif input_ids is not None:
        check_inputs(config, input_ids, None, kwargs.get("attention_mask"), None)
    else:
        return  # generate() starts from the BOS token
    generation_config = kwargs.get("generation_config") or (args[1] if len(args) > 1 else None) or generation_config
    prompt = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
    max_new_tokens = kwargs.get("max_new_tokens", generation_config.max_new_tokens)
    total = prompt + max_new_tokens if max_new_tokens is not None else kwargs.get("max_length",
                                                                                 generation_config.max_length)
    if total > config.max_position_embeddings:
        logger.warning_once(
            f"generate(): the prompt ({prompt} tokens) plus max_new_tokens ({total - prompt}) reaches position "
            f"{total}, beyond max_position_embeddings={config.max_position_embeddings}. The model computes those positions "
            "(RoPE needs no table), but was not trained on them: expect the text to degrade past that point."
        )


def remove_old_model_module(save_directory: Path) -> None:
    """Re-saving a model saved by an older version over its own folder: drop the old `modeling_ptt.py` (no longer
    named by `auto_map`), which shadows the installed package for any Python started in that folder."""
    old_module = save_directory / "modeling_ptt.py"
    if old_module.is_file() and "class PTForCausalLM(" in old_module.read_text(errors="replace"):
        logger.warning(f"{old_module}: removed the model code of an older version (the model's code is now "
                       f"{MODEL_MODULE}.py; a file named modeling_ptt.py shadows the modeling_ptt package)")
        old_module.unlink()


class PTPreTrainedModel(PreTrainedModel):
    config_class = PTConfig
    config: PTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PTDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    # Hidden states are not recorded from a module: a layer outputs the tracks, not their mean (see PTModel.forward).
    _can_record_outputs = {
        "router_logits": OutputRecorder(PTTopKRouter, index=0),
        "attentions": PTAttention,
    }

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        r"""
        transformers' `from_pretrained`, plus track parallelism with transformers' own keywords: under `torchrun` or
        `accelerate launch` with W processes, `distributed_config=DistributedConfig(tp_size=W)` (or `tp_size=W`, or
        `tp_plan="auto"`) gives rank `r` the tracks `[r*n/W, (r+1)*n/W)`, read as slices of the checkpoint, and the
        shared embedding, norm and head. W must divide `num_tracks`. `process_group_timeout` (seconds) bounds how
        long a rank waits for a dead peer. See `distributed_ptt` for why this does not go through transformers'
        DTensor tensor-parallel loader.

        Either way a truncated or corrupt safetensors file, or one of the model's weights stored as integers or
        booleans, is refused before any weight loads, with an error that names the file (and the tensor). Tensors
        the model does not have are reported as unexpected and left unloaded, as transformers does.

        `quantization_config=TorchAoConfig(...)` quantizes the track projections as transformers quantizes a Llama's
        linear layers, and a model so quantized saves and reloads; other quantization methods, which know `nn.Linear`
        only, are refused, naming the track weights they would leave in full precision (see `quantization_ptt`).
        """
        world_size = track_parallel_size(kwargs)
        if world_size is None:
            hub_kwargs = {name: kwargs[name] for name in HUB_KWARGS if kwargs.get(name) is not None}
            check_quantization_method(cls, pretrained_model_name_or_path, kwargs, hub_kwargs, PTTrackLinear)
            check_safetensors_checkpoint(cls, pretrained_model_name_or_path, kwargs)
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
            quantize_track_weights(loaded[0] if isinstance(loaded, tuple) else loaded, PTTrackLinear, PTExperts)
            return loaded
        if model_args:
            raise TypeError("from_pretrained with track parallelism takes no positional model arguments")
        return load_track_parallel(cls, pretrained_model_name_or_path, world_size, kwargs)

    def track_stacked_parameter_names(self) -> list[str]:
        """Parameters whose dim 0 is the track, i.e. every parameter of a decoder layer (dense or sparse, norms
        included): a rank holds only its slice of them."""
        return [
            f"{layer_name}.{param_name}"
            for layer_name, layer in self.named_modules()
            if isinstance(layer, PTDecoderLayer)
            for param_name, _ in layer.named_parameters()
        ]

    def place_tracks(self, process_group: dist.ProcessGroup | None, num_local_tracks: int) -> None:
        """Declare that this process holds `num_local_tracks` tracks and merges with the ranks of `process_group`."""
        for module in self.modules():
            if isinstance(module, PTTrackSync):
                module.num_local_tracks = num_local_tracks
                module.process_group = process_group

    @property
    def holds_all_tracks(self) -> bool:
        """False after a track-parallel load with W > 1: this process holds `num_tracks / W` of the tracks."""
        return all(sync.num_local_tracks == sync.num_tracks for sync in self.modules() if isinstance(sync, PTTrackSync))

    def save_pretrained(self, save_directory, *args, **kwargs):
        if not self.holds_all_tracks:
            raise ValueError("This process holds only its own tracks (track-parallel load): saving them would write "
                             "a partial checkpoint. Load the model in a single process to save it.")
        super().save_pretrained(save_directory, *args, **kwargs)
        remove_old_model_module(Path(save_directory))

    def set_sync_schedule(self, track_block_depth: int | None = None, sync_mode: str | None = None) -> None:
        """Change when the tracks merge on a built model, e.g. to compare block depths on the same weights (a
        different `track_block_depth` or `sync_mode` is a different function of them). The config is updated too, so
        a save keeps the new schedule. The schedule is fixed at construction: assigning the two config fields
        directly makes the next forward raise."""
        config, base = self.config, self.base_model
        track_block_depth = config.track_block_depth if track_block_depth is None else track_block_depth
        sync_mode = config.sync_mode if sync_mode is None else sync_mode
        check_sync_schedule(track_block_depth, sync_mode)
        config.track_block_depth, config.sync_mode = track_block_depth, sync_mode
        base.sync_schedule = (track_block_depth, sync_mode)
        base.track_blocks = config.track_blocks()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        if isinstance(module, PTTrackLinear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, PTExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.down_proj, mean=0.0, std=self.config.initializer_range)


class PTModel(PTPreTrainedModel):
    """Shared embedding, `num_hidden_layers` track-stacked layers merged every `track_block_depth`, final norm."""

    def __init__(self, config: PTConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([PTDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.track_sync = PTTrackSync(config.num_tracks)
        # the layers of each run between two merges (`set_sync_schedule` changes them)
        self.sync_schedule = (config.track_block_depth, config.sync_mode)
        self.track_blocks: tuple[range, ...] = config.track_blocks()
        self.has_sparse_layers = "sparse" in config.mlp_layer_types
        self.gradient_checkpointing = False
        self.post_init()

    def check_sync_schedule(self) -> None:
        """Refuse to run a schedule other than the config's: the blocks are computed once, not at every forward."""
        config = self.config
        if (config.track_block_depth, config.sync_mode) != self.sync_schedule:
            raise ValueError(
                f"PTConfig.track_block_depth={config.track_block_depth!r}, sync_mode={config.sync_mode!r} were "
                f"assigned on a built model that merges as track_block_depth={self.sync_schedule[0]!r}, "
                f"sync_mode={self.sync_schedule[1]!r}: change the schedule with model.set_sync_schedule(...)"
            )

    @deprecate_old_cache_keyword
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        r"""
        `cache` and `past_key_values` are the same argument (transformers renamed it in 5.x; both are accepted, and
        `past_key_values` warns where transformers' own models deprecate it).

        With `output_hidden_states=True`, as in Llama, entry 0 is the embedding output, entry `l` the state after
        layer `l` and the last entry the final norm's output (`last_hidden_state`); the state after a layer is the
        mean of the tracks' residual streams (in a distributed run one extra all_reduce per layer that does not end a
        block, only when asked for). With `output_attentions=True` and an attention implementation that returns
        weights (`eager`), `attentions` holds one `[batch, heads, query_len, key_len]` tensor per layer, the heads of
        all tracks in track order; under track parallelism, of the rank's own tracks only. With
        `output_router_logits=True`, `router_logits` holds one `[n_local, batch * seq_len, num_experts]` tensor per
        sparse layer (none for a model without sparse layers).
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        self.check_sync_schedule()
        cache = cache if cache is not None else past_key_values
        check_inputs(self.config, input_ids, inputs_embeds, attention_mask, cache, reads_token_ids(self, input_ids))
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        # the masks search position ids for packed sequences, reading them (a host sync every training step): the ones
        # made here hold one sequence per row, so only the caller's are given to them
        mask_position_ids = position_ids
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        if isinstance(attention_mask, dict):  # one mask per layer type, already made (static cache, paged cache)
            causal_masks = attention_mask
        else:  # the cache is passed by position: its keyword is `cache` or `past_key_values` by version
            mask_args = (self.config, inputs_embeds, attention_mask, cache, mask_position_ids)
            causal_masks = {kind: MASK_FUNCTIONS[kind](*mask_args) for kind in set(self.config.layer_types)}
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        sync = self.track_sync
        sublayer_sync = sync if self.config.sync_mode == "tensor_parallel" else None

        hidden_states = inputs_embeds
        # Recorded here rather than by `_can_record_outputs`: a layer outputs the tracks, and a hidden state is their
        # mean, which at the end of a block is the merge the next block starts from.
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for block in self.track_blocks:
            tracks = sync.dispatch(hidden_states)
            for layer_idx in block:
                layer = self.layers[layer_idx]
                tracks = layer(
                    tracks,
                    attention_mask=causal_masks[layer.attention_type],
                    position_embeddings=position_embeddings,
                    cache=cache,
                    sublayer_sync=sublayer_sync,
                    **kwargs,
                )
                if output_hidden_states and layer_idx != block[-1]:
                    all_hidden_states += (sync.merge(tracks),)
            hidden_states = sync.merge(tracks)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)

        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)
        return MoeModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, **{CACHE_FIELD: cache}
        )


class PTForCausalLM(PTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PTConfig):
        super().__init__(config)
        self.model = PTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_llama(cls, llama_model: PreTrainedModel, num_tracks: int) -> "PTForCausalLM":
        """Convert a dense `LlamaForCausalLM` into `num_tracks` tracks in `sync_mode="tensor_parallel"`.

        The result computes the same logits as the Llama (up to float rounding): it is the tensor-parallel baseline,
        and a starting point for PT layouts: `model.set_sync_schedule(sync_mode="track_block", track_block_depth=D)`
        makes it a PT model (a different function of the same weights).
        """
        config = pt_config_from_llama(llama_model.config, num_tracks)
        config._attn_implementation = llama_model.config._attn_implementation
        model = cls(config).to(dtype=llama_model.dtype, device=llama_model.device)
        model.load_state_dict(llama_state_dict_to_tracks(llama_model.state_dict(), num_tracks), strict=True)
        return model.train(llama_model.training)

    def to_llama(self) -> LlamaForCausalLM:
        """The `LlamaForCausalLM` this model is, when it is a dense model: one track, or `from_llama`'s tensor-parallel
        layout (see `conversion_ptt`). Raises, naming the field or tensor, when it is not."""
        if not self.holds_all_tracks:
            raise ValueError("This process holds only its own tracks (track-parallel load): convert in one process")
        config = llama_config_from_pt(self.config)
        config._attn_implementation = self.config._attn_implementation
        state_dict = tracks_state_dict_to_llama(self.state_dict(), self.config.num_tracks)
        llama = LlamaForCausalLM(config).to(dtype=self.dtype, device=self.device)
        llama.load_state_dict(state_dict, strict=True)
        return llama.train(self.training)

    def generate(self, *args, **kwargs):
        r"""
        transformers' `generate()`, with the prompt checked first: a token id outside `[0, vocab_size)`, an empty
        prompt or an `attention_mask` that does not fit it raises a `ValueError` naming it (not an error inside the
        first forward, or on CUDA a device-side assert that ends the process).

        A prompt plus `max_new_tokens` longer than `max_position_embeddings` is generated, with a warning (once per
        length): RoPE computes any position, so nothing fails, but the model never saw those positions in training.
        """
        check_generate_inputs(self.config, self.generation_config, args, kwargs)
        return super().generate(*args, **kwargs)

    @deprecate_old_cache_keyword
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast | MoeCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Targets for the usual shifted next-token cross-entropy; `-100` is ignored.
        logits_to_keep (`int` or `torch.Tensor`, defaults to 0):
            Compute logits only for the last `logits_to_keep` positions (0: all), or for the given indices.

        A model with sparse layers, or one asked for router logits, returns a `MoeCausalLMOutputWithPast`. Unlike
        Mixtral, the load-balancing loss is computed (and `router_aux_loss_coef` times it added to `loss`) whenever
        `labels` are given, so training balances the experts without `output_router_logits=True`; `aux_loss` is
        also returned when router logits are asked for.
        """
        check_labels(labels, input_ids, inputs_embeds, self.config.vocab_size, reads_token_ids(self, labels))
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        has_sparse_layers = self.model.has_sparse_layers
        needs_router_logits = output_router_logits or (has_sparse_layers and labels is not None)
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=needs_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        common = {
            "logits": logits,
            "hidden_states": outputs.hidden_states,
            "attentions": outputs.attentions,
            CACHE_FIELD: getattr(outputs, CACHE_FIELD),
        }
        if not (has_sparse_layers or output_router_logits):
            return CausalLMOutputWithPast(loss=loss, **common)
        aux_loss = None
        if has_sparse_layers and needs_router_logits:
            is_padding_mask = isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
            padding_mask = attention_mask if is_padding_mask else None
            aux_loss = self.model.track_sync.mean_over_ranks(pt_load_balancing_loss(
                outputs.router_logits, self.config.num_experts, self.config.num_experts_per_tok, padding_mask
            ))
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            router_logits=outputs.router_logits if output_router_logits else None,
            **common,
        )


# `save_pretrained` copies this module and the ones it imports next to the weights (remote code).
PTModel.register_for_auto_class("AutoModel")
PTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["PTPreTrainedModel", "PTModel", "PTForCausalLM", "check_batch"]
