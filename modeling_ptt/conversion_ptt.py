"""Dense Llama checkpoints to track layout, in `sync_mode="tensor_parallel"`.

Splitting a dense layer by heads and FFN columns gives `n` tracks whose partial outputs SUM to the dense output. PT
merges tracks by their MEAN, so the row-parallel projections (`o_proj`, `down_proj`) are multiplied by `n`. Biases of
those projections are kept as they are: every track adds the full bias and the mean of `n` equal biases is the bias.
Merging after every sublayer (tensor-parallel mode) then computes exactly the dense model.
"""

import torch

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
