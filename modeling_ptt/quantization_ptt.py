"""Quantized track weights, through the `quantization_config` users already write.

transformers' quantizers replace or quantize `nn.Linear` modules; PT's projections are `PTTrackLinear`s holding one
`[n, out, in]` weight, so every quantizer would pass them over and leave most of the model in full precision. torchao
is the one whose tensor subclasses quantize a 3-D weight row by row (a track's rows never share a scale with
another track's) and index it by track, which is all `PTTrackLinear.forward` needs: one `F.linear` per track on its
2-D slice. So with `TorchAoConfig` the loader quantizes the track projections after transformers has quantized what it
knows, and saves and reloads them with transformers' own torchao serialization; any other method is refused before a
byte of weights loads, naming the weights it would have left alone.

What stays in full precision, as in transformers' Llama and Mixtral: the embedding, the head, the norms and the
routers. PT-MoE's experts (`[n, E, rows, cols]`, four dims) are beyond torchao's subclasses and stay in full
precision too, with a warning that names them.
"""

import importlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)

TORCHAO = "torchao"
# Why each method, as transformers integrates it, cannot reach a track weight.
ONLY_LINEAR = {
    "bitsandbytes": "bitsandbytes swaps nn.Linear modules for its Linear8bitLt / Linear4bit, whose weights and CPU "
                    "kernels are 2-D only",
    "quanto": "optimum-quanto swaps nn.Linear modules for its QLinear, which holds one 2-D weight",
}


def quant_method(quantization_config) -> str:
    method = (quantization_config.get("quant_method") if isinstance(quantization_config, dict)
              else getattr(quantization_config, "quant_method", None))
    return str(getattr(method, "value", method))


def track_weights(model: nn.Module, module_class: type) -> Iterator[tuple[str, nn.Module]]:
    """The track projections: every `module_class` instance (`PTTrackLinear`) except its subclasses, the routers,
    which stay in full precision as Mixtral's do."""
    return ((name, module) for name, module in model.named_modules() if type(module) is module_class)


def share_of_weights(model: nn.Module, names: list[str]) -> float:
    """The share of the model's parameter elements in the tensors `names`."""
    sizes = {name: param.numel() for name, param in model.named_parameters()}
    return sum(sizes[name] for name in names) / sum(sizes.values())


def describe(names: list[str], share: float) -> str:
    leaves = sorted({".".join(name.split(".")[-3:]) for name in names})
    return f"{len(names)} track weights ({', '.join(leaves)} in every layer; {share:.0%} of the weight elements)"


def check_quantization_method(model_class, path, kwargs: dict, hub_kwargs: dict, module_class: type) -> None:
    """Before loading: refuse a quantization method other than torchao, asked for in the call or by a pre-quantized
    checkpoint's config; it would quantize the model's `nn.Linear`s only, i.e. none of its track projections."""
    config = kwargs.get("config")
    if not isinstance(config, PreTrainedConfig):
        if kwargs.get("quantization_config") is None and path is None:
            return
        config = model_class.config_class.from_pretrained(config if config is not None else path, **hub_kwargs)
    quantization_config = kwargs.get("quantization_config") or getattr(config, "quantization_config", None)
    method = quant_method(quantization_config)
    if quantization_config is None or method == TORCHAO:
        return
    with torch.device("meta"):
        meta_model = model_class(config)
    names = [f"{name}.weight" for name, _ in track_weights(meta_model, module_class)]
    reason = ONLY_LINEAR.get(method, f"{method} quantizes nn.Linear modules only")
    raise ValueError(
        f"quantization_config ({method}): {reason}, and PT's projections are not nn.Linear (one [tracks, out, in] "
        f"weight each): the {describe(names, share_of_weights(meta_model, names))} would stay in full precision. "
        "torchao quantizes them: quantization_config=TorchAoConfig(Int8WeightOnlyConfig())."
    )


def quantize_track_weights(model: nn.Module, module_class: type, experts_class: type) -> None:
    """After transformers' torchao load: quantize the track projections with the config's torchao config (a
    pre-quantized checkpoint's come quantized; an `FqnToConfig` chose its own modules), and name what stays."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or quant_method(quantizer.quantization_config) != TORCHAO:
        return
    config = quantizer.quantization_config.get_apply_tensor_subclass()
    if not quantizer.pre_quantized and type(config).__name__ != "FqnToConfig":
        # Looked up, not imported: transformers refuses to load remote code whose imports are not all installed,
        # and only torchao users have torchao.
        quantize_ = importlib.import_module("torchao.quantization").quantize_
        skipped = quantizer.modules_to_not_convert or []
        left = []
        for name, module in track_weights(model, module_class):
            if any(name == key or name.startswith(f"{key}.") or name.endswith(f".{key}") for key in skipped):
                continue
            try:
                quantize_(module, config, filter_fn=lambda *_: True)
            except Exception as error:
                raise ValueError(
                    f"torchao's {type(config).__name__} cannot quantize {name}.weight "
                    f"{list(module.weight.shape)} (one matrix per track): {error}"
                ) from error
            if type(module.weight) is nn.Parameter:
                left.append(f"{name}.weight")
        if left:  # e.g. a config with no kernel for this device, which leaves a Llama's linear layers alone too
            raise ValueError(
                f"torchao's {type(config).__name__} left the {describe(left, share_of_weights(model, left))} in "
                f"full precision on {model.device}. Int8WeightOnlyConfig quantizes them on every device."
            )
    experts = [f"{name}.{param}" for name, module in model.named_modules() if isinstance(module, experts_class)
               for param, _ in module.named_parameters()]
    if experts:
        logger.warning(
            f"torchao: the {len(experts)} expert weights ({experts[0]}, ... [tracks, experts, rows, cols]; "
            f"{share_of_weights(model, experts):.0%} of the weight elements) stay in full precision: torchao's "
            "quantized tensors hold at most 3 dims."
        )
