"""The optimizer of a PT model: AdamW whose groups know the track dim, and PT's output-projection scale."""

import torch

from .parallelize import unwrap


def is_output_projection(name: str) -> bool:
    """The projections that write into the residual stream, whose step PT's mean-merge scales by 1/num_tracks."""
    return name.endswith(("o_proj.weight", "down_proj.weight"))


@torch.no_grad()
def scale_output_projections(model: torch.nn.Module, scale: float) -> None:
    """Multiply o_proj/down_proj's weights by `scale` (`--output-proj-scale`)."""
    for name, param in model.named_parameters():
        if is_output_projection(name):
            param.mul_(scale)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                    output_proj_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW over `model` (as `parallelize_ptt` returned it); matrices decay, norms and biases do not (a layer's
    parameters carry the track as an extra dim 0). `output_proj_scale` s also scales o_proj/down_proj's LR by s (and
    their weight decay by 1/s, so the decay per step lr*wd is unchanged): with s=1/n a dense model gets the effective
    init and step size that PT's mean-merge gives those projections (docs/quality.md)."""
    groups: dict[tuple[float, float], list] = {}
    track_stacked = set(unwrap(model).track_stacked_parameter_names())
    for name, param in unwrap(model).named_parameters():
        is_matrix = param.dim() - (name in track_stacked) >= 2
        group_lr, decay = lr, weight_decay if is_matrix else 0.0
        if is_output_projection(name):
            group_lr, decay = lr * output_proj_scale, decay / output_proj_scale
        groups.setdefault((group_lr, decay), []).append(param)
    return torch.optim.AdamW(
        [{"params": params, "lr": group_lr, "weight_decay": decay} for (group_lr, decay), params in groups.items()],
        lr=lr,
        betas=(0.9, 0.95),
    )
