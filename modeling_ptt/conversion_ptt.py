"""Dense Llama checkpoints to track layout, in `sync_mode="tensor_parallel"`, and back.

Splitting a dense layer by heads and FFN columns gives `n` tracks whose partial outputs SUM to the dense output. PT
merges tracks by their MEAN, so the row-parallel projections (`o_proj`, `down_proj`) are multiplied by `n`. Biases of
those projections are kept as they are: every track adds the full bias and the mean of `n` equal biases is the bias.
Merging after every sublayer (tensor-parallel mode) then computes exactly the dense model.

The way back is the same map inverted. It exists where the PT model is a dense model: one track (merging one track
is the identity, so every schedule computes the same), or tracks merged after every sublayer whose shared tensors
(norms, row-parallel biases) are equal across tracks, and none of the AFM layer options.
"""

import torch
from transformers import LlamaConfig

from .configuration_ptt import PTConfig


LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters",
    "attention_bias", "attention_dropout", "mlp_bias",
)
COLUMN_PARALLEL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


def pt_config_from_llama(llama_config, num_tracks: int) -> PTConfig:
    """The PT config that runs a dense Llama as `num_tracks` tensor-parallel tracks."""
    fields = {field: getattr(llama_config, field) for field in LLAMA_FIELDS if hasattr(llama_config, field)}
    return PTConfig(
        **fields,
        num_tracks=num_tracks,
        track_block_depth=1,
        sync_mode="tensor_parallel",
        architectures=["PTForCausalLM"],
    )


def llama_state_dict_to_tracks(state_dict: dict[str, torch.Tensor], num_tracks: int) -> dict[str, torch.Tensor]:
    """Map a `LlamaForCausalLM` state dict to the track-stacked PT layout (see the module docstring)."""
    n = num_tracks
    converted = {}
    for name, tensor in state_dict.items():
        module, _, kind = name.rpartition(".")
        if module.endswith(COLUMN_PARALLEL):  # weight [out, in] -> [n, out/n, in]; bias [out] -> [n, out/n]
            tensor = tensor.reshape(n, tensor.shape[0] // n, *tensor.shape[1:])
        elif module.endswith(ROW_PARALLEL) and kind == "weight":  # [out, in] -> [n, out, in/n], times n
            tensor = tensor.reshape(tensor.shape[0], n, -1).transpose(0, 1) * n
        elif module.endswith(ROW_PARALLEL) or module.endswith("layernorm"):  # shared by every track
            tensor = tensor.expand(n, *tensor.shape)
        converted[name] = tensor.contiguous()
    return converted


def llama_config_from_pt(config: PTConfig) -> LlamaConfig:
    """The Llama config of a PT model that is a dense model (see the module docstring); raises, naming the field,
    for one that is not."""
    if config.num_tracks > 1 and config.sync_mode != "tensor_parallel":
        raise ValueError(f"PTConfig.num_tracks={config.num_tracks} with sync_mode={config.sync_mode!r}: tracks that "
                         "run layers on their own are not a dense model; only one track, or tracks merged after "
                         "every sublayer (sync_mode='tensor_parallel'), convert to a Llama")
    afm_options = {
        "qk_norm": config.qk_norm,
        "sliding_window": config.sliding_window is not None,
        "no_rope_layers": not all(config.no_rope_layers or [1]),
        "mlp_layer_types": "sparse" in (config.mlp_layer_types or []),
    }
    for field, in_use in afm_options.items():
        if in_use:
            raise ValueError(f"PTConfig.{field}={getattr(config, field)!r}: a Llama has no such layer option")
    fields = {field: getattr(config, field) for field in LLAMA_FIELDS if hasattr(config, field)}
    return LlamaConfig(**fields, architectures=["LlamaForCausalLM"])


def tracks_state_dict_to_llama(state_dict: dict[str, torch.Tensor], num_tracks: int) -> dict[str, torch.Tensor]:
    """`llama_state_dict_to_tracks` inverted; raises, naming the tensor, where the tracks hold different copies of a
    tensor a Llama has once."""
    n = num_tracks
    converted = {}
    for name, tensor in state_dict.items():
        module, _, kind = name.rpartition(".")
        if module.endswith(COLUMN_PARALLEL):  # [n, out/n, ...] -> [out, ...]
            tensor = tensor.flatten(0, 1)
        elif module.endswith(ROW_PARALLEL) and kind == "weight":  # [n, out, in/n] -> [out, in], over n
            tensor = tensor.transpose(0, 1).flatten(1) / n
        elif module.endswith(ROW_PARALLEL) or module.endswith("layernorm"):  # [n, ...], one copy per track
            if not torch.equal(tensor, tensor[:1].expand_as(tensor)):
                raise ValueError(f"{name}: the {n} tracks hold different values, so the model is not a dense one")
            tensor = tensor[0]
        converted[name] = tensor.contiguous()
    return converted
