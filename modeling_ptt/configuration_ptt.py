"""Configuration of the Parallel Track (PT) Transformer (Wang et al., arXiv:2602.07306)."""

import math

from transformers import PreTrainedConfig


SYNC_MODES = ("track_block", "tensor_parallel")
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
MLP_LAYER_TYPES = ("dense", "sparse")
# Every Auto class a user may load a saved PT model with, not only the one it was saved from. The model's module is
# not called `modeling_ptt.py`: a saved folder on `sys.path` (a script or `python -m` started in it) would shadow the
# package of that name.
MODEL_MODULE = "modeling_parallel_track"
AUTO_MAP = {
    "AutoConfig": "configuration_ptt.PTConfig",
    "AutoModel": f"{MODEL_MODULE}.PTModel",
    "AutoModelForCausalLM": f"{MODEL_MODULE}.PTForCausalLM",
}


def check_sync_schedule(track_block_depth: int, sync_mode: str) -> None:
    """Raise, naming the field, for a merge schedule that cannot work."""
    if isinstance(track_block_depth, bool) or not isinstance(track_block_depth, int) or track_block_depth < 1:
        raise ValueError(f"PTConfig.track_block_depth={track_block_depth!r}: must be a positive integer")
    if sync_mode not in SYNC_MODES:
        raise ValueError(f"PTConfig.sync_mode={sync_mode!r}: must be one of {SYNC_MODES}")


class PTConfig(PreTrainedConfig):
    r"""
    Configuration of a Parallel Track Transformer ([`PTModel`], [`PTForCausalLM`]).

    Field names and meanings follow [`LlamaConfig`]: `num_attention_heads`, `num_key_value_heads` and
    `intermediate_size` are TOTALS over all tracks; every track carries the full `hidden_size` residual stream and
    owns `1/num_tracks` of the heads, KV heads and FFN width. PT adds:

    Args:
        num_tracks (`int`, defaults to 8):
            Number of parallel tracks. `num_tracks=1` is a plain Llama.
        track_block_depth (`int`, defaults to 8):
            Layers a track runs on its own before all tracks are merged (mean of their residual streams). The tracks
            are always merged after the last layer, so the last block is shorter when it does not divide
            `num_hidden_layers`.
        sync_mode (`str`, defaults to `"track_block"`):
            `"track_block"` merges every `track_block_depth` layers (PT). `"tensor_parallel"` merges after every
            attention and every FFN sublayer, which is exactly a dense Llama run with tensor parallelism: the
            baseline PT is measured against, and the layout [`PTForCausalLM.from_llama`] converts to.

    Layer options of Apple's AFM 2025 PT-MoE, named and meant as in transformers' Mistral, Qwen3, SmolLM3 and Mixtral
    configs. All are off by default, which is the plain PT model:

        layer_types (`list[str]`, *optional*):
            `"full_attention"` or `"sliding_attention"` per layer. Defaults to sliding attention on every layer when
            `sliding_window` is set (as Mistral), else full attention everywhere.
        sliding_window (`int`, *optional*):
            Tokens a sliding-attention layer sees, the current one included (transformers' convention: Mistral,
            Qwen3). Required when a layer is `"sliding_attention"`.
        no_rope_layers (`list[int]`, *optional*):
            As in `SmolLM3Config`: a `1` at index `l` means layer `l` uses RoPE, a `0` makes it a NoPE layer (no
            position encoding, as AFM's global layers). Defaults to RoPE on every layer.
        qk_norm (`bool`, defaults to `False`):
            RMSNorm over the head dim of every query and key head before RoPE (as Qwen3), weights per track.
        mlp_layer_types (`list[str]`, *optional*):
            `"dense"` (SwiGLU of width `intermediate_size / num_tracks`) or `"sparse"` (per-track mixture of experts)
            per layer. Defaults to sparse on every layer when `num_experts` is set (as Mixtral), else dense everywhere.
        num_experts (`int`, *optional*):
            Experts PER TRACK in a sparse layer. A track routes its tokens among its own experts only, so experts never
            leave their track and a distributed forward needs no extra collective.
        num_experts_per_tok (`int`, defaults to 2):
            Experts (top-k) a token uses in a sparse layer, all of its own track.
        moe_intermediate_size (`int`, *optional*):
            SwiGLU width of one expert. Required when a layer is `"sparse"`.
        norm_topk_prob (`bool`, defaults to `True`):
            Renormalise the top-k routing probabilities to sum to 1 (Mixtral and AFM do).
        router_aux_loss_coef (`float`, defaults to 0.001):
            Weight of the load-balancing loss added to the LM loss whenever labels are given (the loss of every
            sparse layer and track on its own, averaged: see `pt_load_balancing_loss`).
        output_router_logits (`bool`, defaults to `False`):
            Return the routers' logits (one `[n, batch * seq_len, num_experts]` tensor per sparse layer).

    Derived, read-only: `num_attention_heads_per_track`, `num_key_value_heads_per_track`,
    `intermediate_size_per_track`, `num_sync_points` (merges per forward).

    ```python
    >>> from modeling_ptt import PTConfig, PTForCausalLM
    >>> config = PTConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
    ...                   num_key_value_heads=4, num_tracks=4, track_block_depth=2, vocab_size=1000)
    >>> model = PTForCausalLM(config)
    >>> config.num_sync_points
    2
    ```
    """

    model_type = "ptt"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    num_tracks: int = 8
    track_block_depth: int = 8
    sync_mode: str = "track_block"
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    no_rope_layers: list[int] | None = None
    qk_norm: bool = False
    mlp_layer_types: list[str] | None = None
    num_experts: int | None = None
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self._validate_track_layout()
        self._set_layer_type_defaults()
        self._validate_layer_options()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """transformers' `save_pretrained`; the saved `auto_map` names every Auto class a PT model loads with (a saved
        model or config records only its own class otherwise)."""
        self.auto_map = {**(getattr(self, "auto_map", None) or {}), **AUTO_MAP}
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def _fail(self, field: str, why: str):
        raise ValueError(f"PTConfig.{field}={getattr(self, field)!r}: {why}")

    def _validate_track_layout(self):
        """Raise early, naming the field, for every shape a PT model cannot have."""

        fail = self._fail

        for field in ("num_tracks", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
                      "intermediate_size", "vocab_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(field, "must be a positive integer")
        check_sync_schedule(self.track_block_depth, self.sync_mode)
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim < 1):
            fail("head_dim", "must be a positive integer or None")
        n = self.num_tracks
        for field in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            if getattr(self, field) % n:
                fail(field, f"must be divisible by num_tracks={n}: every track owns an equal share")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_attention_heads",
                 f"must be divisible by num_key_value_heads={self.num_key_value_heads} (grouped-query attention)")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            fail("hidden_size",
                 f"must be divisible by num_attention_heads={self.num_attention_heads} when head_dim is not set")

    def _set_layer_type_defaults(self):
        """Spell out the per-layer lists, as transformers' configs do, so that layer `l` simply reads entry `l`."""
        num_layers = self.num_hidden_layers
        if self.layer_types is None:
            attention = "sliding_attention" if self.sliding_window is not None else "full_attention"
            self.layer_types = [attention] * num_layers
        if self.no_rope_layers is None:
            self.no_rope_layers = [1] * num_layers
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["sparse" if self.num_experts is not None else "dense"] * num_layers

    def _validate_layer_options(self):
        """Raise early, naming the field, for every layer option that cannot work."""

        fail = self._fail

        def positive_int(value):
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        for field, allowed in (("layer_types", ATTENTION_LAYER_TYPES), ("no_rope_layers", (0, 1)),
                               ("mlp_layer_types", MLP_LAYER_TYPES)):
            value = getattr(self, field)
            if not isinstance(value, (list, tuple)) or len(value) != self.num_hidden_layers:
                fail(field, f"must be a list of num_hidden_layers={self.num_hidden_layers} entries")
            if any(entry not in allowed for entry in value):
                fail(field, f"every entry must be one of {allowed}")
        if self.sliding_window is not None and not positive_int(self.sliding_window):
            fail("sliding_window", "must be a positive integer or None")
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            fail("sliding_window", "must be set when layer_types has a 'sliding_attention' layer")
        if not isinstance(self.qk_norm, bool):
            fail("qk_norm", "must be True or False")
        coef = self.router_aux_loss_coef
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or coef < 0:
            fail("router_aux_loss_coef", "must be a number >= 0")

        if "sparse" not in self.mlp_layer_types and self.num_experts is None:
            return
        for field in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            if not positive_int(getattr(self, field)):
                fail(field, "must be a positive integer when mlp_layer_types has a 'sparse' layer")
        if self.num_experts_per_tok > self.num_experts:
            fail("num_experts_per_tok", f"must be at most num_experts={self.num_experts} (the experts of one track)")

    @property
    def num_attention_heads_per_track(self) -> int:
        return self.num_attention_heads // self.num_tracks

    @property
    def num_key_value_heads_per_track(self) -> int:
        return self.num_key_value_heads // self.num_tracks

    @property
    def intermediate_size_per_track(self) -> int:
        return self.intermediate_size // self.num_tracks

    @property
    def num_sync_points(self) -> int:
        """Merges (all_reduce collectives when tracks sit on different devices) per forward."""
        return self.sync_point_count(self.num_hidden_layers, self.track_block_depth, self.sync_mode)

    @staticmethod
    def sync_point_count(num_hidden_layers: int, track_block_depth: int, sync_mode: str = "track_block") -> int:
        """Merges per forward of any layout: `ceil(L/D)` for PT, `2L` (one per sublayer) for tensor parallelism."""
        if sync_mode == "tensor_parallel":
            return 2 * num_hidden_layers
        return math.ceil(num_hidden_layers / track_block_depth)

    def track_blocks(self) -> tuple[range, ...]:
        """The layers of every run between two merges (one layer each in tensor-parallel mode)."""
        sync_after = [i + 1 for i in range(self.num_hidden_layers) if self.is_sync_layer(i)]
        return tuple(range(start, end) for start, end in zip([0, *sync_after[:-1]], sync_after))

    def is_sync_layer(self, layer_idx: int) -> bool:
        """Whether the tracks are merged after layer `layer_idx` (0-based)."""
        return (
            self.sync_mode == "tensor_parallel"
            or (layer_idx + 1) % self.track_block_depth == 0
            or layer_idx == self.num_hidden_layers - 1
        )


PTConfig.register_for_auto_class()

__all__ = ["PTConfig"]
