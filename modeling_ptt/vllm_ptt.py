"""The Parallel Track (PT) Transformer as a vLLM-native model, registered through vLLM's plugin system.

With vLLM and this package installed, `LLM(model=DIR)` and `vllm serve DIR` run a PT checkpoint saved by
`save_pretrained` (no remote code, no conversion). It is built as vLLM's own Llama and Qwen3-MoE are: vLLM's linear
layers (fused QKV and gate-up GEMMs, so `--quantization` reaches every projection), `RMSNorm` with the residual add
fused in, `SiluAndMul`, vLLM's fused-MoE layer for PT-MoE's experts, `@support_torch_compile` (vLLM's default mode
compiles it; on GPUs with CUDA graphs) and pipeline parallelism.

Placement. vLLM's tensor-parallel axis is the track axis: with `tensor_parallel_size=W` (W must divide `num_tracks`),
rank `r` holds tracks `[r*n/W, (r+1)*n/W)`. Each track of a layer is a Llama layer of the track's width whose
projections are vLLM layers with `disable_tp=True` (a track is whole on its rank), and the rank's tracks share ONE vLLM
`Attention` over all their heads, so the paged KV cache of a rank holds its own tracks' KV heads. Tracks stay separate
inputs (each has its own residual stream and norm weights); at W < n a rank runs its tracks one after the other, which
the compiled graph fuses into one program. A merge is the sum of the rank's tracks' residual streams, ONE all_reduce
over vLLM's tensor-parallel group, divided by n: `ceil(L/D)` per forward (`2L` in `sync_mode="tensor_parallel"`).

Pipeline parallelism cuts the layers only where the tracks are merged (`pipeline_stages`): vLLM hands the next stage
one tensor that it slices over the tensor-parallel ranks and gathers again, which is right only when every rank holds
the same tensor, i.e. the merged residual stream.

The embedding is replicated, so it adds no collective. The LM head is replicated by default too;
`hf_overrides={"lm_head_placement": "vocab_parallel"}` splits its vocabulary over the ranks instead, for one
all_gather of the logits per step: it saves each rank `(W-1)/W` of the head's matmul, which pays where the head is
a large part of a rank's work (a large vocabulary on many GPUs).

This module is the only one that imports vLLM, and nothing the remote-code modules import imports it, so
`save_pretrained` never copies it and loading a model never needs vLLM.
"""

import copy
import glob
import os
from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.logger import init_logger
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.fused_moe import FusedMoEFactory
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader, download_weights_from_hf
from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig
from vllm.model_executor.models.interfaces import SupportsLoRA, SupportsPP, SupportsQuant
from vllm.model_executor.models.utils import PPMissingLayer, make_empty_intermediate_tensors_factory
from vllm.sequence import IntermediateTensors

from .configuration_ptt import PTConfig
from .distributed_ptt import iter_track_slices
from .placement import check_track_split, track_range
from .modeling_parallel_track import PTForCausalLM


logger = init_logger(__name__)
ARCHITECTURE = "PTForCausalLM"
LM_HEAD_PLACEMENTS = ("replicated", "vocab_parallel")


def check_track_placement(config: PTConfig, world_size: int) -> None:
    """vLLM accepts any tensor-parallel size that divides the head count; tracks need one that divides n."""
    check_track_split(config.num_tracks, world_size, f"tensor_parallel_size={world_size}")


def pipeline_stages(config: PTConfig, num_stages: int) -> list[range]:
    """The layers of every pipeline stage: whole track blocks, as close to `L / num_stages` layers each as the block
    boundaries allow (each cut at the merge nearest its even share)."""
    blocks = config.track_blocks()
    if num_stages > len(blocks):
        raise ValueError(
            f"pipeline_parallel_size={num_stages} cannot be served: a stage boundary must fall where the tracks "
            f"merge, and num_hidden_layers={config.num_hidden_layers} with track_block_depth="
            f"{config.track_block_depth} ({config.sync_mode}) has {len(blocks)} track blocks (use at most "
            f"{len(blocks)} stages)"
        )
    block_ends = [block.stop for block in blocks]
    cuts, first_free = [0], 0
    for stage in range(1, num_stages):
        # leave at least one block for each later stage
        candidates = range(first_free, len(blocks) - (num_stages - stage))
        best = min(candidates, key=lambda b: abs(block_ends[b] - stage * config.num_hidden_layers / num_stages))
        cuts.append(block_ends[best])
        first_free = best + 1
    cuts.append(config.num_hidden_layers)
    return [range(start, stop) for start, stop in zip(cuts, cuts[1:])]


def lm_head_placement(config: PTConfig) -> str:
    """"replicated" (the default) or "vocab_parallel", as `hf_overrides` set it on the config."""
    placement = getattr(config, "lm_head_placement", "replicated")
    if placement not in LM_HEAD_PLACEMENTS:
        raise ValueError(f"lm_head_placement={placement!r}: must be one of {LM_HEAD_PLACEMENTS}")
    if placement == "vocab_parallel" and config.tie_word_embeddings:
        raise ValueError("lm_head_placement='vocab_parallel' with tie_word_embeddings=True: the tied head is the "
                         "replicated embedding table")
    return placement


class PTVllmConfigCheck(VerifyAndUpdateConfig):
    """Runs in the process that builds the engine's config, so a bad placement is raised by `LLM(...)` (and printed
    by `vllm serve`) instead of failing inside a worker as a generic engine start-up error."""

    @staticmethod
    def verify_and_update_config(vllm_config: VllmConfig) -> None:
        config, parallel = vllm_config.model_config.hf_config, vllm_config.parallel_config
        check_track_placement(config, parallel.tensor_parallel_size)
        pipeline_stages(config, parallel.pipeline_parallel_size)
        lm_head_placement(config)
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act={config.hidden_act!r}: vLLM's fused SwiGLU (SiluAndMul) needs 'silu'")


class PTVllmTrackSync(nn.Module):
    """Dispatch the merged residual stream to the rank's tracks, and merge their streams: local sum, ONE all_reduce
    when W > 1, divided by n."""

    def __init__(self, num_tracks: int, num_local_tracks: int):
        super().__init__()
        self.num_tracks = num_tracks
        self.num_local_tracks = num_local_tracks

    def dispatch(self, merged: torch.Tensor) -> list[torch.Tensor]:
        """One residual stream per local track. The fused `RMSNorm(x, residual)` may add into `residual` in place, so
        every track but the first gets its own copy (the first track's first in-place add comes after every track
        has read the merged state)."""
        return [merged] + [merged.clone() for _ in range(self.num_local_tracks - 1)]

    def merge(self, hidden: list[torch.Tensor | None], residual: list[torch.Tensor]) -> torch.Tensor:
        streams = [r if h is None else h + r for h, r in zip(hidden, residual)]
        merged = streams[0] if len(streams) == 1 else torch.stack(streams).sum(0)
        if self.num_local_tracks != self.num_tracks:
            merged = tensor_model_parallel_all_reduce(merged)
        return merged / self.num_tracks


def pre_norm(norm: RMSNorm, hidden: torch.Tensor | None, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's pre-norm with the residual add fused in; `hidden=None` when `residual` is already the whole stream."""
    return (norm(residual), residual) if hidden is None else norm(hidden, residual)


class PTVllmTrackAttention(nn.Module):
    """One track's attention projections: fused QKV, output, and QK-norm's per-head norms. The kernel between them
    is the layer's, shared by the rank's tracks."""

    def __init__(self, config: PTConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.head_dim = config.head_dim
        heads, kv_heads = config.num_attention_heads_per_track, config.num_key_value_heads_per_track
        self.q_size, self.kv_size = heads * self.head_dim, kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, heads, kv_heads,
                                          bias=config.attention_bias, quant_config=quant_config,
                                          prefix=f"{prefix}.qkv_proj", disable_tp=True)
        self.o_proj = RowParallelLinear(self.q_size, config.hidden_size, bias=config.attention_bias,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj", disable_tp=True)
        # QK-norm (Qwen3, AFM): RMSNorm of every query and key head over the head dim
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None

    def qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        query, key, value = self.qkv_proj(hidden_states)[0].split([self.q_size, self.kv_size, self.kv_size], -1)
        if self.q_norm is not None:
            query = self.q_norm(query.unflatten(-1, (-1, self.head_dim))).flatten(-2)
            key = self.k_norm(key.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        return query, key, value


class PTVllmMLP(nn.Module):
    """One track's SwiGLU FFN of width `intermediate_size / num_tracks`."""

    def __init__(self, config: PTConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        width = config.intermediate_size_per_track
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [width] * 2, bias=config.mlp_bias,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj",
                                                       disable_tp=True)
        self.down_proj = RowParallelLinear(width, config.hidden_size, bias=config.mlp_bias, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj", disable_tp=True)
        self.act_fn = SiluAndMul()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(hidden_states)[0]))[0]


class PTVllmSparseMoeBlock(nn.Module):
    """One track's experts in vLLM's fused-MoE layer, routed by the track's own router. The layer is built with no
    tensor, data or context parallelism (`tp_size=dp_size=pcp_size=1`): the track's experts are whole on its rank,
    so no token leaves it and the merge stays the only collective."""

    def __init__(self, config: PTConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        # routers stay unquantized, as vLLM's Mixtral and Qwen3-MoE keep theirs
        self.gate = ReplicatedLinear(config.hidden_size, config.num_experts, bias=False, quant_config=None,
                                     prefix=f"{prefix}.gate")
        self.experts = FusedMoEFactory(
            num_experts=config.num_experts, top_k=config.num_experts_per_tok, hidden_size=config.hidden_size,
            intermediate_size=config.moe_intermediate_size, renormalize=config.norm_topk_prob,
            quant_config=quant_config, tp_size=1, dp_size=1, pcp_size=1, reduce_results=False,
            prefix=f"{prefix}.experts",
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        router_logits, _ = self.gate(hidden_states)
        return self.experts(hidden_states=hidden_states, router_logits=router_logits)


class PTVllmTrackLayer(nn.Module):
    """Layer `l` of one track: what a Llama layer owns, at the track's width (the attention kernel aside)."""

    def __init__(self, config: PTConfig, layer_idx: int, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = PTVllmTrackAttention(config, quant_config, prefix=f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        sparse = config.mlp_layer_types[layer_idx] == "sparse"
        self.mlp = (PTVllmSparseMoeBlock if sparse else PTVllmMLP)(config, quant_config, prefix=f"{prefix}.mlp")


class PTVllmDecoderLayer(nn.Module):
    """Layer `l` of the rank's tracks: every track's pre-norm and QKV, ONE vLLM `Attention` over all their heads
    (track `t` owns a contiguous head group, so vLLM's GQA mapping never crosses a track), every track's output
    projection, pre-norm and FFN."""

    def __init__(self, config: PTConfig, layer_idx: int, local_tracks: range, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        quant_config = vllm_config.quant_config
        self.tracks = nn.ModuleDict({
            str(track): PTVllmTrackLayer(config, layer_idx, quant_config, prefix=f"{prefix}.tracks.{track}")
            for track in local_tracks
        })
        head_dim = config.head_dim
        # NoPE layers (AFM's global layers) attend without any position encoding
        self.rotary_emb = (
            get_rope(head_dim, max_position=config.max_position_embeddings, rope_parameters=config.rope_parameters,
                     is_neox_style=True)
            if config.no_rope_layers[layer_idx] else None
        )
        sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.attn = Attention(
            config.num_attention_heads_per_track * len(local_tracks),
            head_dim,
            head_dim**-0.5,
            num_kv_heads=config.num_key_value_heads_per_track * len(local_tracks),
            cache_config=vllm_config.cache_config,
            quant_config=quant_config,
            per_layer_sliding_window=config.sliding_window if sliding else None,
            prefix=f"{prefix}.attn",
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden: list[torch.Tensor | None],
        residual: list[torch.Tensor],
        sublayer_sync: PTVllmTrackSync | None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each track's stream is `hidden + residual` (`hidden` None: `residual` alone), as in vLLM's Llama, whose
        norms add the residual in. `sublayer_sync` (tensor-parallel mode) also merges between attention and FFN."""
        tracks = list(self.tracks.values())
        normed, residual = zip(*(pre_norm(track.input_layernorm, h, r)
                                 for track, h, r in zip(tracks, hidden, residual)))
        query, key, value = (torch.cat(parts, -1) for parts in zip(*(track.self_attn.qkv(x)
                                                                     for track, x in zip(tracks, normed))))
        if self.rotary_emb is not None:
            query, key = self.rotary_emb(positions, query, key)
        attn_output = self.attn(query, key, value).chunk(len(tracks), -1)
        hidden = [track.self_attn.o_proj(out)[0] for track, out in zip(tracks, attn_output)]
        if sublayer_sync is not None:
            residual = sublayer_sync.dispatch(sublayer_sync.merge(hidden, residual))
            hidden = [None] * len(tracks)
        normed, residual = zip(*(pre_norm(track.post_attention_layernorm, h, r)
                                 for track, h, r in zip(tracks, hidden, residual)))
        return [track.mlp(x) for track, x in zip(tracks, normed)], list(residual)


@support_torch_compile(
    dynamic_arg_dims={
        "input_ids": {0: "b"},
        "positions": {0: "b"},
        "intermediate_tensors": {0: "b"},
        "inputs_embeds": {0: "b"},
    }
)
class PTVllmModel(nn.Module):
    """Replicated embedding, this pipeline stage's layers (the rank's tracks of each) merged every `track_block_depth`
    layers, final norm. Dispatch, D layers, merge, repeat: the transformers model's loop."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: PTConfig = vllm_config.model_config.hf_config
        world_size = get_tensor_model_parallel_world_size()
        check_track_placement(config, world_size)
        self.config = config
        self.local_tracks = track_range(get_tensor_model_parallel_rank(), world_size, config.num_tracks)
        pp_group = get_pp_group()
        self.stage_layers = pipeline_stages(config, pp_group.world_size)[pp_group.rank_in_group]
        self.is_first_stage, self.is_last_stage = pp_group.is_first_rank, pp_group.is_last_rank
        tied_head_here = config.tie_word_embeddings and self.is_last_stage
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size, disable_tp=True)
                             if self.is_first_stage or tied_head_here else PPMissingLayer())
        self.layers = nn.ModuleList(
            PTVllmDecoderLayer(config, i, self.local_tracks, vllm_config, prefix=f"{prefix}.layers.{i}")
            if i in self.stage_layers else PPMissingLayer()
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if self.is_last_stage else PPMissingLayer()
        self.track_sync = PTVllmTrackSync(config.num_tracks, len(self.local_tracks))
        self.track_blocks = [block for block in config.track_blocks() if block.start in self.stage_layers]
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if not self.is_first_stage:
            hidden_states = intermediate_tensors["hidden_states"]
        else:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        sync = self.track_sync
        sublayer_sync = sync if self.config.sync_mode == "tensor_parallel" else None
        for block in self.track_blocks:
            hidden, residual = [None] * sync.num_local_tracks, sync.dispatch(hidden_states)
            for layer_idx in block:
                hidden, residual = self.layers[layer_idx](positions, hidden, residual, sublayer_sync)
            hidden_states = sync.merge(hidden, residual)
        if not self.is_last_stage:
            return IntermediateTensors({"hidden_states": hidden_states})
        return self.norm(hidden_states)


# checkpoint tensor (after `model.layers.{l}.`) -> (the track layer's parameter, vLLM shard id)
STACKED_PARAMETERS = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
EXPERTS = {"mlp.experts.gate_up_proj": "mlp.experts.routed_experts.w13_weight",
           "mlp.experts.down_proj": "mlp.experts.routed_experts.w2_weight"}


class PTVllmForCausalLM(nn.Module, SupportsLoRA, SupportsPP, SupportsQuant):
    """vLLM's entry point for a PT checkpoint (`architectures: ["PTForCausalLM"]`).

    LoRA adapts every track's projections (`layers.{l}.tracks.{t}.self_attn.q_proj`, ...); an adapter trained with
    PEFT on the transformers model is written in that layout by `modeling_ptt.peft_ptt.adapter_for_vllm`."""

    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    embedding_modules: dict[str, str] = {}  # the embedding and the LM head take no adapter

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: PTConfig = vllm_config.model_config.hf_config
        self.config = config
        self.vllm_config = vllm_config
        self.model = PTVllmModel(vllm_config=vllm_config, prefix="model")
        self.local_tracks = self.model.local_tracks
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        if self.model.is_last_stage:
            # vocab_parallel: each rank its slice of the vocabulary, gathered by the logits processor
            vocab_parallel = lm_head_placement(config) == "vocab_parallel"
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix="lm_head",
                                          disable_tp=not vocab_parallel)
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
            self.logits_processor = LogitsProcessor(config.vocab_size)
        else:
            self.lm_head = PPMissingLayer()

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def checkpoint_files(self) -> list[str]:
        model_config = self.vllm_config.model_config
        folder = model_config.model
        if not os.path.isdir(folder):  # a Hub id: vLLM has downloaded it already, this finds the cached snapshot
            folder = download_weights_from_hf(
                folder, self.vllm_config.load_config.download_dir, ["*.safetensors"], model_config.revision
            )
        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"{folder}: no *.safetensors file (PT checkpoints are loaded from safetensors)")
        return files

    def checkpoint_shapes(self) -> dict[str, torch.Size]:
        """Every tensor of this stage in the checkpoint, with its full (all tracks) shape: the transformers model's
        state dict, built on the meta device."""
        config = copy.deepcopy(self.config)
        with torch.device("meta"):
            shapes = {name: tensor.shape for name, tensor in PTForCausalLM(config).state_dict().items()}
        stage = self.model.stage_layers

        def on_this_stage(name: str) -> bool:
            if name.startswith("model.layers."):
                return int(name.split(".")[2]) in stage
            if name == "model.embed_tokens.weight":
                return not isinstance(self.model.embed_tokens, PPMissingLayer)
            return self.model.is_last_stage and not (name == "lm_head.weight" and self.config.tie_word_embeddings)

        return {name: shape for name, shape in shapes.items() if on_this_stage(name)}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Read this rank's slices straight from the safetensors files, one tensor at a time: only rows
        `local_tracks` of every track-stacked tensor (dim 0 is the track) of this stage's layers, whole shared
        tensors, each checked against the full shape the config gives (`iter_track_slices`, what transformers'
        track-parallel load reads with), and hand every track's part to its vLLM layer's `weight_loader` (which
        shards fused projections and wraps online quantization). vLLM's `weights` iterator is left unread, since it
        would read every tensor whole on every rank, except for a checkpoint saved quantized by torchao, whose
        tensors only vLLM's torchao reader puts back together."""
        params = dict(self.named_parameters(remove_duplicate=False))
        expected = self.checkpoint_shapes()
        track_stacked = {name for name in expected if name.startswith("model.layers.")}
        loaded, self.read_shapes, bytes_read = set(), {}, 0
        if getattr(self.quant_config, "is_checkpoint_torchao_serialized", False):
            slices = self.torchao_track_slices(weights, expected, track_stacked)
        else:
            slices = iter_track_slices(self.checkpoint_files(), lambda name: name if name in expected else None,
                                       expected, track_stacked, self.local_tracks, torch.device("cpu"), dtype=None)
        for name, tensor in slices:
            self.read_shapes[name] = list(tensor.shape)
            bytes_read += tensor.numel() * tensor.element_size()
            if name in track_stacked:
                for index, track in enumerate(self.local_tracks):  # indexed: a torchao tensor cannot be unbound
                    loaded.add(self.load_track_tensor(params, name, track, tensor[index]))
            else:  # the embedding and head loaders pad the vocabulary (and keep a vocab-parallel rank's rows)
                getattr(params[name], "weight_loader", default_weight_loader)(params[name], tensor)
                loaded.add(name)
        if self.config.tie_word_embeddings and self.model.is_last_stage:
            loaded.add("lm_head.weight")
        self.bytes_read = bytes_read
        logger.info("PT tracks %s of %d, layers %s: read %.1f MiB of weights", self.local_tracks,
                    self.config.num_tracks, self.model.stage_layers, bytes_read / 2**20)
        return loaded

    def torchao_track_slices(
        self, weights: Iterable[tuple[str, torch.Tensor]], expected: dict[str, torch.Size], track_stacked: set[str]
    ) -> Iterable[tuple[str, torch.Tensor]]:
        """This rank's part of a torchao checkpoint, as `iter_track_slices` gives a plain one: vLLM's reader has
        rebuilt each quantized tensor whole (all tracks), of which the rank keeps its own tracks."""
        for name, tensor in weights:
            if name not in expected:
                continue
            if tensor.shape != expected[name]:
                raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the config implies "
                                 f"{tuple(expected[name])}")
            yield name, tensor[self.local_tracks.start:self.local_tracks.stop] if name in track_stacked else tensor

    @staticmethod
    def load_track_tensor(params: dict[str, nn.Parameter], name: str, track: int, tensor: torch.Tensor) -> str:
        """Give track `track`'s part of the checkpoint tensor `name` to its layer; returns the parameter's name."""
        layer, _, within = name.removeprefix("model.layers.").partition(".")
        module, _, kind = within.rpartition(".")  # e.g. "self_attn.q_proj", "weight"
        prefix = f"model.layers.{layer}.tracks.{track}."
        if within in EXPERTS:
            param_name = prefix + EXPERTS[within]
            param = params[param_name]
            for expert, expert_tensor in enumerate(tensor):
                if within == "mlp.experts.down_proj":
                    param.weight_loader(param, expert_tensor, param_name, shard_id="w2", expert_id=expert)
                    continue
                gate, up = expert_tensor.chunk(2)
                param.weight_loader(param, gate, param_name, shard_id="w1", expert_id=expert)
                param.weight_loader(param, up, param_name, shard_id="w3", expert_id=expert)
            return param_name
        if module in STACKED_PARAMETERS:
            fused, shard_id = STACKED_PARAMETERS[module]
            param_name = f"{prefix}{fused}.{kind}"
            params[param_name].weight_loader(params[param_name], tensor, shard_id)
            return param_name
        param_name = prefix + within
        param = params[param_name]
        getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        return param_name


def register() -> None:
    """The `vllm.general_plugins` entry point: vLLM calls it in every process before it reads a model config.
    Importing this package registers `model_type="ptt"` with AutoConfig, so vLLM reads a PT config without remote
    code."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, PTVllmForCausalLM)
    MODELS_CONFIG_MAP[ARCHITECTURE] = PTVllmConfigCheck
