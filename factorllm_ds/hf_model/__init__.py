"""The FactorLLM Hugging Face model; these files are also copied into every converted folder."""

from pathlib import Path

MODEL_CODE_DIR = Path(__file__).parent
MODEL_CODE_FILES = ("configuration_factorllm.py", "modeling_factorllm.py")
AUTO_MAP = {
    "AutoConfig": "configuration_factorllm.FactorLLMConfig",
    "AutoModelForCausalLM": "modeling_factorllm.FactorLLMForCausalLM",
}


def register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from factorllm_ds.hf_model.configuration_factorllm import FactorLLMConfig
    from factorllm_ds.hf_model.modeling_factorllm import FactorLLMForCausalLM

    AutoConfig.register("factorllm", FactorLLMConfig, exist_ok=True)  # exist_ok: calling again is no error
    AutoModelForCausalLM.register(FactorLLMConfig, FactorLLMForCausalLM, exist_ok=True)
