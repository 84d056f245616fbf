"""Models: shared modules, one package per family, and HF checkpoint loading.

Importing this package registers every family. Each family package owns its size table (the public ``config.json``
values of each released model), its builders and its HF name/layout conversion (a ``ModelFamily``):

| family package | HF architectures | named builders (each also as ``lora_<name>``) |
|---|---|---|
| ``llama`` | LlamaForCausalLM, MistralForCausalLM | llama3_2_1b/3b, llama3_1_8b/70b, llama3_8b/70b, llama2_7b/13b/70b, tinyllama_1_1b, mistral_7b |
| ``qwen2`` | Qwen2ForCausalLM | qwen2_0_5b/1_5b/7b, qwen2_5_0_5b/1_5b/3b/7b/14b |
| ``qwen3`` | Qwen3ForCausalLM | qwen3_0_6b/1_7b/4b/8b/14b |
| ``gpt2`` | GPT2LMHeadModel | gpt2_small/medium/large/xl, dialogpt_small/medium/large |
| ``phi3`` | Phi3ForCausalLM | phi3_mini, phi3_medium (4k context; longrope not supported) |
| ``gemma`` | GemmaForCausalLM | gemma_2b, gemma_7b (Gemma 1 only) |
| ``opt`` | OPTForCausalLM | opt_125m/350m/1_3b/2_7b/6_7b/13b |
| ``t5`` (encoder-decoder) | T5ForConditionalGeneration | t5_small/base/large, flan_t5_small/base/large/xl/xxl |
| ``bart`` (encoder-decoder) | BartForConditionalGeneration | bart_base, bart_large, bart_large_cnn, distilbart_cnn_12_6 |

Builders are also reachable by model line: ``kdtune.models.{llama3_2, llama3_1, llama3, llama2, tinyllama, mistral,
qwen2, qwen2_5, qwen3, gpt2}.<name>``. Generic builders for any dimensions: ``llama.llama``, ``qwen2.qwen2``,
``qwen3.qwen3``, ``gpt2.gpt2``, ``opt.opt``, ``t5.t5``, ``bart.bart``.
Any supported checkpoint directory works without a named builder:
``load_hf_model(dir, dtype, device)`` (architecture + weights) or ``hf_model(dir, **lora_kwargs)`` (architecture only).

Every decoder-only model is a ``TransformerDecoder`` carrying ``hf_family`` and ``hf_config``; T5 and BART build an
``EncoderDecoder`` (``modules/encoder_decoder.py``; ``generation.generate_seq2seq`` drives its caches).
It holds no non-persistent buffers
(RoPE is computed from positions on the fly), so it can be built under ``torch.device("meta")``, materialised with
``to_empty`` and filled from a checkpoint (or ``init_weights()``). KV caches exist only after ``setup_caches``;
``kdtune.models.generation.generate`` drives them for batched, left-padded prompts.
"""

from kdtune.models import bart, gemma, gpt2, llama, opt, phi3, qwen2, qwen3, t5  # noqa: F401  (each registers its family)
from kdtune.models.checkpointer import HFCheckpointer, load_state_dict_shardwise
from kdtune.models.hf import hf_model, load_hf_model, read_hf_config
from kdtune.models.modules import TransformerDecoder, enable_activation_checkpointing
from kdtune.models.modules.lora import LoRALinear, apply_lora

__all__ = [
    "HFCheckpointer",
    "LoRALinear",
    "TransformerDecoder",
    "apply_lora",
    "enable_activation_checkpointing",
    "hf_model",
    "load_hf_model",
    "load_state_dict_shardwise",
    "read_hf_config",
]
