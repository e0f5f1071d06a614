"""`transformers serve ARGS...` for a saved PT model.

The server looks a checkpoint's class up by name on the `transformers` module (`getattr(transformers,
config.architectures[0])` in `cli/serving/model_manager.py`, 5.19 to 5.24), so a model class that lives outside
transformers, remote code included, is not found however `--trust-remote-code` is set. This puts PT's causal-LM class
where it looks, then runs the command line unchanged.
"""

import sys

import transformers
from transformers.cli.transformers import main

from modeling_ptt import PTForCausalLM


if __name__ == "__main__":
    transformers.PTForCausalLM = PTForCausalLM
    sys.argv = ["transformers", "serve", *sys.argv[1:]]
    main()
