#!/usr/bin/env python
"""LoRA on PT beside LoRA on Llama (and PT-MoE beside Mixtral) under the same PEFT configs: trainable parameters and
the loss over a few steps of fitting one fixed batch, from random models of the shapes in configuration/.

    python scripts/peft_comparison.py [--steps 20] [--seed 0]

Prints a markdown table. Every model sees the same batch and optimizer. The dense rows add a PT model converted from
that very Llama (`PTForCausalLM.from_llama`, tensor-parallel layout: the same function at step 0), so that the
adapters are compared on equal footing, beside a random PT model of the same shape. The loss columns compare how
quickly the adapters move each model, not how good any model is.
"""

import copy

import argparse
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

import modeling_ptt.peft_ptt  # noqa: F401  (PEFT learns PT's track layers)
from modeling_ptt import PTConfig, PTForCausalLM

CONFIGS = Path(__file__).resolve().parent.parent / "configuration"
LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "tie_word_embeddings")
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
RUNS = [  # (PEFT config, PT config file, the dense or MoE baseline)
    ("q_proj, v_proj; r=8", dict(target_modules=["q_proj", "v_proj"], r=8), "ptt-tiny.json", "llama"),
    ("all-linear; r=8, dropout 0.05", dict(target_modules="all-linear", r=8, lora_dropout=0.05), "ptt-tiny.json",
     "llama"),
    ("all-linear + experts; r=8", dict(target_modules="all-linear", target_parameters=EXPERTS, r=8),
     "ptt-tiny-moe.json", "mixtral"),
]


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every matrix random at std 0.1 (norms left at one), so that logits are far from uniform from the start."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.1)
    return model


def baseline(kind: str, pt_config: PTConfig) -> torch.nn.Module:
    fields = {field: getattr(pt_config, field) for field in LLAMA_FIELDS}
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**fields))
    # Mixtral: every layer sparse, with as many experts of the same width as one PT track has
    fields["intermediate_size"] = pt_config.moe_intermediate_size
    return MixtralForCausalLM(MixtralConfig(**fields, num_local_experts=pt_config.num_experts,
                                            num_experts_per_tok=pt_config.num_experts_per_tok))


def fit(model: torch.nn.Module, batch: torch.Tensor, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print("| LoRA config | model | trainable parameters | loss at step 1 | loss at step "
          f"{args.steps} |\n|---|---|---:|---:|---:|")
    for label, lora, config_file, baseline_kind in RUNS:
        pt_config = PTConfig.from_json_file(CONFIGS / config_file)
        batch = torch.randint(0, pt_config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(args.seed))
        reference = randomized(baseline(baseline_kind, pt_config), args.seed)
        models = {baseline_kind.capitalize(): reference}
        if baseline_kind == "llama":
            models[f"PT converted from that Llama ({pt_config.num_tracks} tracks)"] = PTForCausalLM.from_llama(
                reference, pt_config.num_tracks)
        models[f"PT, random ({config_file})"] = randomized(PTForCausalLM(pt_config), args.seed)
        for name, model in models.items():
            peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**lora))
            losses = fit(peft_model, batch, args.steps)
            trainable = peft_model.get_nb_trainable_parameters()[0]
            print(f"| {label} | {name} | {trainable:,} | {losses[0]:.3f} | {losses[-1]:.3f} |")


if __name__ == "__main__":
    main()
