"""PEFT for the Parallel Track (PT) Transformer: LoRA on the track layers, with the configs written for Llama.

PEFT adapts `nn.Linear` modules and 2-D or 3-D parameters; PT's projections are `PTTrackLinear`s, one 3-D weight
`[tracks, out, in]` per projection, and PT-MoE's experts are 4-D `[tracks, experts, out, in]`. Importing this module
once, before `get_peft_model`, `PeftModel.from_pretrained` or `AutoPeftModelForCausalLM.from_pretrained`, teaches PEFT
both, so that the LoRA configs written for Llama and Mixtral work unchanged:

    import modeling_ptt.peft_ptt  # noqa: F401

- `LoraConfig(target_modules=["q_proj", "v_proj"])`, any of Llama's projection names, or `target_modules="all-linear"`
  (the MoE routers excluded, as Mixtral's are): each track gets its own adapter, stacked like the weight it adapts
  (`lora_A` `[tracks, r, in]`, `lora_B` `[tracks, out, r]`) and run as batched matmuls beside it. `r`, `lora_alpha`,
  `lora_dropout`, `use_rslora`, `lora_bias`, `init_lora_weights` (True, False, "gaussian"), merging and mixed-adapter
  batches work as on `nn.Linear`; DoRA and the other LoRA variants and data-dependent initialisations are refused.
- `target_parameters=["experts.gate_up_proj", "experts.down_proj"]`, as for transformers' Mixtral: one adapter per
  expert of every track, with PEFT's limits for adapted parameters (no dropout, no DoRA, no bias).
- `LoraConfig()` with no targets takes Llama's default (`q_proj`, `v_proj`).
- Other PEFT methods (IA3, LoHa, LoKr, OFT, ...) aimed at a track layer raise an error that names LoRA.

Adapters are saved in PEFT's own format, so they reload through `PeftModel.from_pretrained` and
`AutoPeftModelForCausalLM` (with this module imported). vLLM's PT model holds every track's projections as layers of
their own; `adapter_for_vllm` (also `scripts/convert_adapter_for_vllm.py`) writes an adapter in that layout. This module imports PEFT; nothing the remote-code modules
import imports it, so `save_pretrained` never copies it and loading a model never needs PEFT.
"""

import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from peft.tuners import tuners_utils
from peft.tuners.lora import LoraModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS, ParamWrapper, _LoraParameterProxy
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import PeftType
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors.torch import load_file, save_file
from torch import nn

from .modeling_parallel_track import PTTrackLinear


ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# A model loaded through remote code has its own copies of these classes, so they are recognised by name.
TRACK_LINEAR = "PTTrackLinear"
EXPERTS = "PTExperts"
SUPPORTED_INITS = (True, False, "gaussian")


def is_track_linear(module: nn.Module) -> bool:
    """A PT projection (exactly: the routers, a subclass, are excluded, as Mixtral's are by PEFT's 'all-linear')."""
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return type(module).__name__ == TRACK_LINEAR


class PTTrackLoraLinear(LoraLinear):
    """LoRA on a `PTTrackLinear`: one adapter per track, its factors stacked over tracks like the weight
    (`lora_A.weight` `[n, r, in]`, `lora_B.weight` `[n, out, r]`), so PEFT's `Linear` logic (forward, merge, delta
    `B @ A`) carries over as batched matmuls."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        check_lora_options(config, self.get_base_layer())
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        num_tracks = self.get_base_layer().weight.shape[0]
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = PTTrackLinear(num_tracks, self.in_features, r)
        self.lora_B[adapter_name] = PTTrackLinear(num_tracks, r, self.out_features, bias=config.lora_bias)
        self.lora_bias[adapter_name] = config.lora_bias
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def reset_lora_parameters(self, adapter_name: str, init_lora_weights) -> None:
        """PEFT's initialisations, per track: a 3-D weight's fan-in as `nn.init` computes it would mix the tracks in."""
        lora_A, lora_B = self.lora_A[adapter_name], self.lora_B[adapter_name]
        if init_lora_weights == "gaussian":
            nn.init.normal_(lora_A.weight, std=1 / self.r[adapter_name])
        else:  # nn.Linear's default of each track's [r, in] matrix (kaiming_uniform with a=sqrt(5))
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(lora_A.weight, -bound, bound)
        if init_lora_weights is False:  # a random, non-identity adapter, as PEFT's
            bound = 1 / math.sqrt(self.r[adapter_name])
            nn.init.uniform_(lora_B.weight, -bound, bound)
        else:
            nn.init.zeros_(lora_B.weight)
        if lora_B.bias is not None:
            nn.init.zeros_(lora_B.bias)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        weight = self.get_base_layer().weight
        if type(weight) is not nn.Parameter:
            raise ValueError(
                f"Cannot merge a LoRA adapter into a quantized track weight ({type(weight).__name__}): load the base "
                "model without quantization_config, merge_and_unload() there, save the merged model and load that "
                "with the quantization_config."
            )
        super().merge(safe_merge, adapter_names)

    def _check_forward_args(self, x: torch.Tensor, *args, **kwargs) -> None:
        super()._check_forward_args(x.transpose(0, 1), *args, **kwargs)  # PEFT counts samples in dim 0

    def _mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
        """Each sample with its own adapter: the batch is dim 1 here, dim 0 being the track."""
        for key in VARIANT_KWARG_KEYS:  # the inputs of LoRA variants, which the track layers do not take
            kwargs.pop(key, None)
        result = self.base_layer(x, *args, **kwargs)
        for adapter in set(adapter_names) & set(self.lora_A):
            samples = [index for index, name in enumerate(adapter_names) if name == adapter]
            inputs = self._cast_input_dtype(x[:, samples], self.lora_A[adapter].weight.dtype)
            update = self.lora_B[adapter](self.lora_A[adapter](self.lora_dropout[adapter](inputs)))
            result[:, samples] += (update * self.scaling[adapter]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + nn.Module.__repr__(self)


def check_lora_options(config, base_layer: nn.Module) -> None:
    if config.use_dora:
        raise ValueError(f"DoRA is not available for PT's track layers ({TRACK_LINEAR}): use plain LoRA "
                         "(use_dora=False)")
    if config.init_lora_weights not in SUPPORTED_INITS:
        raise ValueError(f"init_lora_weights={config.init_lora_weights!r} is not available for PT's track layers "
                         f"({TRACK_LINEAR}); they take {SUPPORTED_INITS}")
    variants = [name for name in ("arrow_config", "use_bdlora", "alora_invocation_tokens", "velora_config",
                                  "monteclora_config", "kasa_config") if getattr(config, name, None)]
    if variants:
        raise ValueError(f"{variants} are LoRA variants that PT's track layers ({TRACK_LINEAR}) do not take: use "
                         "plain LoRA")
    if config.fan_in_fan_out:
        raise ValueError(f"fan_in_fan_out=True does not apply to PT's track layers ({TRACK_LINEAR}), whose weights "
                         "are [tracks, out, in]")


class PTExpertsLoraWrapper(ParamWrapper):
    """PEFT's adapter of a 3-D expert parameter (transformers' Mixtral layout `[experts, out, in]`) on PT-MoE's 4-D
    `[tracks, experts, out, in]`: the track and expert dims fold into one dim of `tracks * experts` experts."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        tracks, experts, out_features, in_features = self.get_param().shape
        self.num_experts = tracks * experts
        self._param_ndim = 3  # the folded view's, which decides PEFT's in/out convention
        return out_features, in_features  # in the order of a 3-D `[experts, in, out]`, which PEFT then swaps

    def get_delta_weight(self, adapter_name, *args, **kwargs) -> torch.Tensor:
        return super().get_delta_weight(adapter_name, *args, **kwargs).view(self.get_param().shape)

    @contextmanager
    def _activate_lora(self, active_adapters: list[str]):
        """PEFT's, without its low-rank fold (a `baddbmm` on the 3-D parameter): the full delta, viewed 4-D."""
        adapters = [adapter for adapter in active_adapters if adapter in self.lora_A]
        if not adapters:
            yield
            return
        delta_weight = sum(self.get_delta_weight(adapter) for adapter in adapters)
        base_layer, requires_grad = self.get_base_layer(), self.get_param().requires_grad
        nn.utils.parametrize.register_parametrization(base_layer, self.parameter_name, _LoraParameterProxy(delta_weight))
        base_layer.parametrizations[self.parameter_name].original.requires_grad_(requires_grad)
        try:
            with nn.utils.parametrize.cached():
                yield
        finally:
            self._remove_parametrizations()


# PEFT tells its parameter wrappers from other adapter layers by class name (to nest one per adapted parameter)
PTExpertsLoraWrapper.__name__ = ParamWrapper.__name__


def dispatch_pt(target: nn.Module, adapter_name: str, config, parameter_name: str | None = None, **kwargs):
    """PEFT's dispatcher for PT's layers; None for every other layer, which PEFT's own dispatchers then take."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if parameter_name is None and is_track_linear(base):
        return PTTrackLoraLinear(target, adapter_name, config=config, **kwargs)
    if parameter_name is not None and type(base).__name__ == EXPERTS and getattr(base, parameter_name).dim() == 4:
        return PTExpertsLoraWrapper(target, adapter_name, parameter_name=parameter_name, config=config, **kwargs)
    return None


def track_linear_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if is_track_linear(module) and "lora_" not in name}


def adapter_for_vllm(adapter_dir: str | Path, output_dir: str | Path) -> Path:
    """Write the LoRA adapter of a PT model saved by PEFT (`adapter_dir`) in the layout of vLLM's PT model, whose
    layers hold each track's projections as layers of their own: every `[tracks, ...]` factor of
    `layers.{l}.self_attn.q_proj` becomes one factor per track, of `layers.{l}.tracks.{t}.self_attn.q_proj`.
    The config is copied, with `target_modules` as projection names. Returns `output_dir`."""
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != PeftType.LORA.value:
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG}: peft_type {config.get('peft_type')!r}; vLLM serves LoRA")
    if config.get("target_parameters"):
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG}: adapters of PT-MoE's experts (target_parameters="
                         f"{config['target_parameters']}) are not served by vLLM's PT model; its projections' are")
    per_track = {}
    for name, factor in load_file(adapter_dir / ADAPTER_WEIGHTS).items():
        match = re.fullmatch(r"(.*\.layers\.\d+)\.(self_attn|mlp)\.(\w+_proj)\.(lora_[AB]\.(?:weight|bias))", name)
        if match is None:
            raise ValueError(f"{adapter_dir / ADAPTER_WEIGHTS}: {name} is not a LoRA factor of a PT projection "
                             f"(layers.N.self_attn.*_proj or layers.N.mlp.*_proj), which is all vLLM's PT model adapts")
        layer, block, projection, factor_name = match.groups()
        for track, track_factor in enumerate(factor.unbind(0)):
            per_track[f"{layer}.tracks.{track}.{block}.{projection}.{factor_name}"] = track_factor.contiguous()
    config["target_modules"] = sorted({name.rsplit(".", 1)[-1] for name in as_list(config["target_modules"])})
    output_dir.mkdir(parents=True, exist_ok=True)
    save_file(per_track, output_dir / ADAPTER_WEIGHTS)
    (output_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return output_dir


def as_list(target_modules: str | list[str]) -> list[str]:
    return [target_modules] if isinstance(target_modules, str) else target_modules


def register() -> None:
    """Hook PT's layers into PEFT (idempotent). PEFT has no registry for layer types (`LoraConfig`'s
    `_register_custom_module` is per config and not saved with the adapter), so its functions that decide are
    wrapped: the LoRA dispatch, the "all-linear" shorthand and, for every other method, the creation of an adapter."""
    if getattr(LoraModel._create_new_module, "pt_registered", False):
        return
    create_new_module = LoraModel._create_new_module
    include_all_linear = tuners_utils._maybe_include_all_linear_layers

    def create_pt_or_other_module(lora_config, adapter_name, target, **kwargs):
        new_module = dispatch_pt(target, adapter_name, lora_config, **kwargs)
        return new_module if new_module is not None else create_new_module(lora_config, adapter_name, target, **kwargs)

    def include_all_linear_and_tracks(peft_config, model):
        is_all_linear = isinstance(getattr(peft_config, "target_modules", None), str) and (
            peft_config.target_modules.lower() == "all-linear")
        peft_config = include_all_linear(peft_config, model)
        if is_all_linear:
            peft_config.target_modules = set(peft_config.target_modules) | track_linear_names(model)
        return peft_config

    create_pt_or_other_module.pt_registered = True
    LoraModel._create_new_module = staticmethod(create_pt_or_other_module)
    tuners_utils._maybe_include_all_linear_layers = include_all_linear_and_tracks
    for peft_type, tuner in PEFT_TYPE_TO_TUNER_MAPPING.items():
        if peft_type != PeftType.LORA and "_create_and_replace" in vars(tuner):
            tuner._create_and_replace = refuse_track_layers(tuner._create_and_replace)
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault("ptt", ["q_proj", "v_proj"])


def refuse_track_layers(create_and_replace):
    """A PEFT method other than LoRA, made to name LoRA when it is aimed at a track layer."""

    def create_and_replace_or_refuse(self, config, adapter_name, target, target_name, *args, **kwargs):
        if is_track_linear(target):
            raise ValueError(
                f"{config.peft_type.value} cannot adapt {kwargs.get('current_key') or target_name}, a PT track layer "
                f"({TRACK_LINEAR}, weight [tracks, out, in]): PT's track layers take LoRA (peft.LoraConfig)")
        return create_and_replace(self, config, adapter_name, target, target_name, *args, **kwargs)

    return create_and_replace_or_refuse


register()
