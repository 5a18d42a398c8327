"""factorllm_ds: FactorLLM (arXiv 2408.11855) on DeepSpeed expert parallelism.

Importing the package registers the FactorLLM config and model with transformers' Auto
classes, so converted folders load with or without ``trust_remote_code``.
"""

__version__ = "0.1.0"

from factorllm_ds.hf_model import register as _register

_register()
