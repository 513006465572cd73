"""Hugging Face checkpoints in and out of tandem's GPT, at any TP x PP layout.

    model = tandem.hf.load_model("path/to/Llama", mesh)   # this rank's shards, read by slices
    tandem.hf.save_model(model, "out/")                   # transformers' from_pretrained loads it

Supported architectures: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
GPT2LMHeadModel. ``tandem.hf.Tokenizer`` encodes and decodes text with the checkpoint's
``tokenizer.json``.
"""

from tandem.hf.config import SUPPORTED, from_gpt_config, read_config, to_gpt_config
from tandem.hf.load import load_model
from tandem.hf.save import save_model

__all__ = ["SUPPORTED", "load_model", "save_model", "read_config", "to_gpt_config", "from_gpt_config"]
