"""Configuration of the Parallel Track (PT) Transformer (Wang et al., arXiv:2602.07306)."""

import math

from transformers import PreTrainedConfig


SYNC_MODES = ("track_block", "tensor_parallel")
AUTO_MAP = {
    "AutoConfig": "configuration_ptt.PTConfig",
    "AutoModel": "modeling_ptt.PTModel",
    "AutoModelForCausalLM": "modeling_ptt.PTForCausalLM",
}


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

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self._validate_track_layout()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:
            # every Auto class a user may load a saved PT model with, not only the one it was saved from
            self.auto_map = dict(AUTO_MAP)

    def _validate_track_layout(self):
        """Raise early, naming the field, for every shape a PT model cannot have."""

        def fail(field, why):
            raise ValueError(f"PTConfig.{field}={getattr(self, field)!r}: {why}")

        for field in ("num_tracks", "track_block_depth", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "hidden_size", "intermediate_size", "vocab_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(field, "must be a positive integer")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim < 1):
            fail("head_dim", "must be a positive integer or None")
        if self.sync_mode not in SYNC_MODES:
            fail("sync_mode", f"must be one of {SYNC_MODES}")
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
        if self.sync_mode == "tensor_parallel":
            return 2 * self.num_hidden_layers
        return math.ceil(self.num_hidden_layers / self.track_block_depth)

    def is_sync_layer(self, layer_idx: int) -> bool:
        """Whether the tracks are merged after layer `layer_idx` (0-based)."""
        return (
            self.sync_mode == "tensor_parallel"
            or (layer_idx + 1) % self.track_block_depth == 0
            or layer_idx == self.num_hidden_layers - 1
        )


PTConfig.register_for_auto_class()

__all__ = ["PTConfig"]
