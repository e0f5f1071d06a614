#!/usr/bin/env python
"""torchao quantization of PT beside a Llama of the same shape, through the `TorchAoConfig` users write: the share of
parameter elements quantized, the checkpoint size after `save_pretrained`, and the logit error against the same
model unquantized.

    python scripts/quantization_table.py [--config configuration/ptt-tiny.json] [--seed 0]

Prints a markdown table. Three random models of the config's shape: a Llama, the same Llama converted to PT's
tensor-parallel layout (`PTForCausalLM.from_llama`: the same function of the same matrices, so the two quantize the
same numbers), and a PT model in block mode.
"""

import argparse
import tempfile
from pathlib import Path

import torch
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TorchAoConfig

from modeling_ptt import PTConfig, PTForCausalLM
from peft_comparison import LLAMA_FIELDS, randomized  # the same random models as the LoRA table's

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"int8 weight-only": Int8WeightOnlyConfig, "int8 dynamic activation, int8 weight":
           Int8DynamicActivationInt8WeightConfig}


def quantized_share(model: torch.nn.Module) -> float:
    sizes = [(param.numel(), type(param) is not torch.nn.Parameter) for param in model.parameters()]
    return sum(size for size, quantized in sizes if quantized) / sum(size for size, _ in sizes)


def checkpoint_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configuration" / "ptt-tiny.json"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pt_config = PTConfig.from_json_file(args.config)
    llama_config = LlamaConfig(**{field: getattr(pt_config, field) for field in LLAMA_FIELDS})
    llama = randomized(LlamaForCausalLM(llama_config), args.seed).eval()
    models = {
        "Llama": llama,
        f"PT converted from that Llama ({pt_config.num_tracks} tracks)": PTForCausalLM.from_llama(
            llama, pt_config.num_tracks).eval(),
        f"PT, random ({Path(args.config).name})": randomized(PTForCausalLM(pt_config), args.seed).eval(),
    }
    input_ids = torch.randint(0, pt_config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(args.seed))
    print("| torchao config | model | parameter elements quantized | checkpoint size | largest logit difference "
          "| mean |")
    print("|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for name, model in models.items():
            model.save_pretrained(Path(tmp) / name)
        for config_name, config in CONFIGS.items():
            for name, model in models.items():
                quantized = AutoModelForCausalLM.from_pretrained(
                    Path(tmp) / name, quantization_config=TorchAoConfig(config())).eval()
                quantized.save_pretrained(Path(tmp) / f"{name} {config_name}")
                difference = (quantized(input_ids).logits - model(input_ids).logits).abs()
                size = checkpoint_bytes(Path(tmp) / f"{name} {config_name}") / checkpoint_bytes(Path(tmp) / name)
                print(f"| {config_name} | {name} | {quantized_share(quantized):.0%} | {size:.0%} of fp32 | "
                      f"{difference.max().item():.2e} | {difference.mean().item():.2e} |")


if __name__ == "__main__":
    main()
