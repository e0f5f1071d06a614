"""The Parallel Track (PT) Transformer as a vLLM-native model, registered through vLLM's plugin system.

With vLLM and this package installed, `LLM(model=DIR)` and `vllm serve DIR` run a PT checkpoint saved by
`save_pretrained` (no remote code, no conversion). vLLM's tensor-parallel axis is the track axis: with
`tensor_parallel_size=W` (W must divide `num_tracks`), rank `r` holds tracks `[r*n/W, (r+1)*n/W)` and one vLLM
`Attention` over their heads, so the paged KV cache of a rank holds its own tracks' KV heads only. A merge is the sum
of the rank's tracks, ONE all_reduce over vLLM's tensor-parallel group, divided by n: `ceil(L/D)` per forward
(`2L` in `sync_mode="tensor_parallel"`). The embedding is replicated, so it adds no collective (a vocab-parallel one
would add an all_reduce to every forward to save memory only). The LM head is replicated by default too;
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
from vllm.config import VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.model_loader.weight_utils import download_weights_from_hf
from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig
from vllm.sequence import IntermediateTensors

from .configuration_ptt import PTConfig
from .distributed_ptt import iter_track_slices
from .modeling_parallel_track import PTMLP, PTAttentionProjections, PTRMSNorm, PTSparseMoeBlock, PTTrackSync


logger = init_logger(__name__)
ARCHITECTURE = "PTForCausalLM"
LM_HEAD_PLACEMENTS = ("replicated", "vocab_parallel")


def check_track_placement(config: PTConfig, world_size: int) -> None:
    """vLLM accepts any tensor-parallel size that divides the head count; tracks need one that divides n."""
    if config.num_tracks % world_size:
        raise ValueError(
            f"tensor_parallel_size={world_size} does not divide num_tracks={config.num_tracks}: every rank must hold "
            f"num_tracks / tensor_parallel_size whole tracks (use a divisor of {config.num_tracks})"
        )


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
        check_track_placement(vllm_config.model_config.hf_config, vllm_config.parallel_config.tensor_parallel_size)
        lm_head_placement(vllm_config.model_config.hf_config)


def local_track_config(config: PTConfig, num_local_tracks: int) -> PTConfig:
    """The config of a model made of this rank's tracks only: same per-track widths, `num_local_tracks` tracks, so the
    transformers layers (`PTMLP`, `PTSparseMoeBlock`, `PTRMSNorm`) build exactly the rank's slices."""
    local = copy.deepcopy(config)
    share = config.num_tracks // num_local_tracks
    local.num_tracks = num_local_tracks
    local.num_attention_heads = config.num_attention_heads // share
    local.num_key_value_heads = config.num_key_value_heads // share
    local.intermediate_size = config.intermediate_size // share
    return local


class PTVllmTrackSync(PTTrackSync):
    """The merge over vLLM's tensor-parallel group: local track sum, ONE all_reduce when W > 1, divided by n."""

    def __init__(self, num_tracks: int, num_local_tracks: int):
        super().__init__(num_tracks)
        self.num_local_tracks = num_local_tracks

    def merge(self, tracks: torch.Tensor) -> torch.Tensor:
        merged = tracks.sum(0)
        if self.num_local_tracks != self.num_tracks:
            merged = tensor_model_parallel_all_reduce(merged)
        return merged / self.num_tracks


class PTVllmAttention(PTAttentionProjections):
    """The rank's tracks' attention: batched track projections, then ONE vLLM `Attention` over all local heads.

    Track `t` owns a contiguous group of query heads and of KV heads, so folding the tracks into the head dim gives
    the usual token-major `[T, heads * head_dim]` layout, in which vLLM's GQA mapping never crosses a track.
    """

    def __init__(self, config: PTConfig, layer_idx: int, vllm_config: VllmConfig, prefix: str):
        super().__init__(config)
        self.num_heads = config.num_attention_heads  # of the local tracks (see local_track_config)
        self.num_kv_heads = config.num_key_value_heads
        # NoPE layers (AFM's global layers) attend without any position encoding
        self.rotary_emb = (
            get_rope(self.head_dim, max_position=config.max_position_embeddings,
                     rope_parameters=config.rope_parameters, is_neox_style=True)
            if config.no_rope_layers[layer_idx] else None
        )
        sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=vllm_config.cache_config,
            per_layer_sliding_window=config.sliding_window if sliding else None,
            prefix=f"{prefix}.attn",
        )

    def tracks_to_tokens(self, states: torch.Tensor, norm: PTRMSNorm | None) -> torch.Tensor:
        """`[n, T, h * hd]` -> `[T, n * h * hd]` (track-major heads), QK-normed per head when `norm` is given."""
        num_tracks, num_tokens, _ = states.shape
        if norm is not None:
            states = norm(states.view(num_tracks, num_tokens, -1, self.head_dim))
        return states.transpose(0, 1).reshape(num_tokens, -1)

    def forward(self, positions: torch.Tensor, tracks: torch.Tensor) -> torch.Tensor:
        num_tracks, num_tokens, _ = tracks.shape
        query = self.tracks_to_tokens(self.q_proj(tracks), self.q_norm)
        key = self.tracks_to_tokens(self.k_proj(tracks), self.k_norm)
        value = self.tracks_to_tokens(self.v_proj(tracks), None)
        if self.rotary_emb is not None:
            query, key = self.rotary_emb(positions, query, key)
        attn_output = self.attn(query, key, value)  # [T, n * h * hd]
        return self.o_proj(attn_output.view(num_tokens, num_tracks, -1).transpose(0, 1))


class PTVllmDecoderLayer(nn.Module):
    """Layer `l` of the rank's tracks: pre-norm attention and pre-norm FFN (dense or the track's own experts)."""

    def __init__(self, config: PTConfig, layer_idx: int, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.self_attn = PTVllmAttention(config, layer_idx, vllm_config, prefix=f"{prefix}.self_attn")
        self.mlp = PTSparseMoeBlock(config) if config.mlp_layer_types[layer_idx] == "sparse" else PTMLP(config)
        self.input_layernorm = PTRMSNorm(config.num_tracks, config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = PTRMSNorm(config.num_tracks, config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, tracks: torch.Tensor, sync: PTVllmTrackSync | None) -> torch.Tensor:
        tracks = self.self_attn(positions, self.input_layernorm(tracks)).add_(tracks)
        if sync is not None:  # tensor-parallel mode also merges between attention and FFN
            tracks = sync.dispatch(sync.merge(tracks))
        return self.mlp(self.post_attention_layernorm(tracks)).add_(tracks)


class PTVllmModel(nn.Module):
    """Replicated embedding, the rank's tracks of every layer merged every `track_block_depth` layers, final norm."""

    def __init__(self, config: PTConfig, local_config: PTConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            PTVllmDecoderLayer(local_config, i, vllm_config, prefix=f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.track_sync = PTVllmTrackSync(config.num_tracks, local_config.num_tracks)
        self.track_blocks = config.track_blocks()

    def forward(self, hidden_states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        sync = self.track_sync
        sublayer_sync = sync if self.config.sync_mode == "tensor_parallel" else None
        for block in self.track_blocks:
            tracks = sync.dispatch(hidden_states)
            for layer_idx in block:
                tracks = self.layers[layer_idx](positions, tracks, sublayer_sync)
            hidden_states = sync.merge(tracks)
        return self.norm(hidden_states)


class PTVllmForCausalLM(nn.Module):
    """vLLM's entry point for a PT checkpoint (`architectures: ["PTForCausalLM"]`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: PTConfig = vllm_config.model_config.hf_config
        world_size = get_tensor_model_parallel_world_size()
        check_track_placement(config, world_size)
        self.config = config
        self.vllm_config = vllm_config
        num_local_tracks = config.num_tracks // world_size
        first = get_tensor_model_parallel_rank() * num_local_tracks
        self.local_tracks = range(first, first + num_local_tracks)
        self.model = PTVllmModel(config, local_track_config(config, num_local_tracks), vllm_config, prefix="model")
        # vocab_parallel: vLLM's own head, each rank its slice of the vocabulary, gathered by its logits processor
        self.logits_processor = None
        if lm_head_placement(config) == "vocab_parallel":
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix="lm_head")
            self.logits_processor = LogitsProcessor(config.vocab_size)
        elif config.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        return self.model(hidden_states, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.logits_processor is not None:
            return self.logits_processor(self.lm_head, hidden_states)
        return nn.functional.linear(hidden_states, self.lm_head.weight)

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

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Read this rank's slices straight from the safetensors files, one tensor at a time: only rows
        `local_tracks` of every track-stacked tensor (dim 0 is the track), whole shared tensors, each checked against
        the full shape the config gives (`iter_track_slices`, what transformers' track-parallel load reads with).
        vLLM's `weights` iterator is lazy and is left unread, since it would read every tensor whole on every
        rank."""
        params = dict(self.named_parameters(remove_duplicate=False))
        track_stacked = {name for name in params if name.startswith("model.layers.")}
        full_shapes = {name: torch.Size([self.config.num_tracks, *param.shape[1:]]) if name in track_stacked
                       else param.shape for name, param in params.items()}
        if self.logits_processor is not None:  # vLLM's head holds a padded slice of the vocabulary
            full_shapes["lm_head.weight"] = torch.Size([self.config.vocab_size, self.config.hidden_size])
        loaded, bytes_read = set(), 0
        slices = iter_track_slices(self.checkpoint_files(), lambda name: name if name in params else None,
                                   full_shapes, track_stacked, self.local_tracks, torch.device("cpu"), dtype=None)
        for name, tensor in slices:
            param = params[name]
            if name == "lm_head.weight" and self.logits_processor is not None:
                param.weight_loader(param, tensor)  # keeps the rank's vocabulary rows, padded
            else:
                with torch.no_grad():
                    param.copy_(tensor)
            bytes_read += tensor.numel() * tensor.element_size()
            loaded.add(name)
        if self.config.tie_word_embeddings:
            loaded.add("lm_head.weight")
        self.bytes_read = bytes_read
        logger.info("PT tracks %s of %d: read %.1f MiB of weights", self.local_tracks, self.config.num_tracks,
                    bytes_read / 2**20)
        return loaded


def register() -> None:
    """The `vllm.general_plugins` entry point: vLLM calls it in every process before it reads a model config.
    Importing this package registers `model_type="ptt"` with AutoConfig, so vLLM reads a PT config without remote
    code."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, PTVllmForCausalLM)
    MODELS_CONFIG_MAP[ARCHITECTURE] = PTVllmConfigCheck
