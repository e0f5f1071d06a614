"""Parallel Track (PT) Transformer for Hugging Face transformers.

Importing the package registers `model_type="ptt"` with the Auto classes, so a saved PT model loads through
`AutoModelForCausalLM.from_pretrained(path)` with or without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_ptt import PTConfig
from .modeling_parallel_track import PTForCausalLM, PTModel, PTPreTrainedModel, check_batch


AutoConfig.register(PTConfig.model_type, PTConfig, exist_ok=True)
AutoModel.register(PTConfig, PTModel, exist_ok=True)
AutoModelForCausalLM.register(PTConfig, PTForCausalLM, exist_ok=True)

__all__ = ["PTConfig", "PTModel", "PTForCausalLM", "PTPreTrainedModel", "check_batch"]
