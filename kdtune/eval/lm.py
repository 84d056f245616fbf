"""A kdtune model as an lm-evaluation-harness language model (registered as ``kdtune``).

:class:`KDTuneLM` scores and generates with any kdtune ``TransformerDecoder`` (every family, LoRA included) and a kdtune
tokenizer, following the conventions of lm-eval's own ``hf`` model so the two give the same numbers on the same
checkpoint:

- text is encoded with BOS where the tokenizer adds one (unless the text already starts with it); the
  log-likelihood prefix of an empty context is BOS, else EOS;
- ``(context + continuation)`` longer than ``max_length + 1`` tokens loses tokens from the left; rolling
  log-likelihood uses lm-eval's disjoint windows of ``max_length`` tokens;
- generation left-truncates the context to ``max_length - max_gen_toks`` tokens, decodes with the KV cache
  (:func:`kdtune.models.generation.generate`), ends a row at EOS or once a stop sequence appears in its text, and cuts
  the text before the first stop sequence (EOS text included).

Importing this module needs ``lm_eval`` (``pip install 'kdtune[eval]'``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn
from tqdm import tqdm

from kdtune.errors import ConfigError, DataError

__all__ = ["DEFAULT_MAX_LENGTH", "KDTuneLM", "default_max_length"]

#: context length used when neither the model config nor the tokenizer names one (lm-eval's default too)
DEFAULT_MAX_LENGTH = 2048

# (context, continuation) strings or None, context ids, continuation ids
_Request = tuple[tuple[str, str] | None, list[int], list[int]]


def default_max_length(model: nn.Module, tokenizer: Any) -> int:
    """The model's context length: ``n_positions``/``max_position_embeddings``/``n_ctx`` of its HF config, else the
    tokenizer's ``max_seq_len``, else :data:`DEFAULT_MAX_LENGTH`."""
    cfg = getattr(model, "hf_config", None) or {}
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return int(cfg[key])
    if getattr(tokenizer, "max_seq_len", None):
        return int(tokenizer.max_seq_len)
    return DEFAULT_MAX_LENGTH


@register_model("kdtune")
class KDTuneLM(TemplateLM):
    """lm-eval ``LM`` over a kdtune model and tokenizer.

    Args:
        model: a kdtune decoder (put in eval mode here), already on its device.
        tokenizer: a kdtune tokenizer (``kdtune.data.load_hf_tokenizer``).
        batch_size: requests per forward pass.
        max_length: context length (see :func:`default_max_length` for None).
        max_gen_toks: tokens generated when a task sets no ``max_gen_toks``.
        seed: seed of sampling-based generation.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        batch_size: int = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r} ('auto' is not supported)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._batch_size = batch_size
        self._max_length = int(max_length) if max_length else default_max_length(model, tokenizer)
        self._max_gen_toks = int(max_gen_toks)
        param = next(model.parameters())
        self._device = param.device
        self._generator = torch.Generator(device=self._device).manual_seed(seed)

    # --------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | Path,
        *,
        adapter: str | Path | None = None,
        tokenizer: str | Path | None = None,
        device: str = "auto",
        dtype: str = "fp32",
        max_seq_len: int | None = None,
        **kwargs: Any,
    ) -> KDTuneLM:
        """Load an HF model directory (e.g. a run's ``final/``), optionally with a PEFT adapter, and wrap it.

        Args:
            pretrained: the model directory.
            adapter: a PEFT LoRA adapter directory to apply on top, or None.
            tokenizer: tokenizer directory (default: ``pretrained``).
            device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
            dtype: ``fp32`` or ``bf16``.
            max_seq_len: context length (None: see :func:`default_max_length`).
            **kwargs: ``batch_size``, ``max_gen_toks``, ``seed``.
        """
        from omegaconf import OmegaConf

        from kdtune.data import load_hf_tokenizer
        from kdtune.eval._model import build_eval_model
        from kdtune.training import get_device, get_dtype
        from kdtune.training.runtime import Runtime

        dev = get_device(device)
        runtime = Runtime(device=dev, dtype=get_dtype(dtype, dev), output_dir=Path("."))
        model_cfg = OmegaConf.create({"_component_": "kdtune.models.hf_model", "checkpoint_dir": str(pretrained)})
        ckpt_cfg = OmegaConf.create(
            {"_component_": "kdtune.models.HFCheckpointer", "checkpoint_dir": str(pretrained), "output_dir": "."}
        )
        model = build_eval_model(model_cfg, ckpt_cfg, runtime, adapter_dir=None if adapter is None else str(adapter))
        tok = load_hf_tokenizer(tokenizer or pretrained)
        return cls(model, tok, max_length=max_seq_len, **kwargs)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None) -> KDTuneLM:
        """lm-eval entry point: ``pretrained=DIR[,adapter=DIR,tokenizer=DIR,dtype=bf16,max_seq_len=N,...]``."""
        args = {**arg_dict, **{k: v for k, v in (additional_config or {}).items() if v is not None}}
        args.pop("max_batch_size", None)
        if "pretrained" not in args:
            raise ConfigError("model_args: the kdtune model needs pretrained=<model dir> (e.g. a run's final/)")
        if isinstance(args.get("batch_size"), str) and args["batch_size"].isdigit():
            args["batch_size"] = int(args["batch_size"])
        return cls.from_pretrained(args.pop("pretrained"), **args)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> KDTuneLM:
        """lm-eval entry point for ``--model_args pretrained=DIR,...``."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ----------------------------------------------------------------------------------------------- properties
    @property
    def eot_token_id(self) -> int:
        """The tokenizer's EOS (end-of-turn for chat models)."""
        return int(self.tokenizer.eos_id)

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context stands for: BOS, else EOS."""
        bos = self.tokenizer.bos_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        """Context length in tokens."""
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        """Generated tokens when a task sets no ``max_gen_toks``."""
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        """Requests per forward pass."""
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        """Fingerprint of the tokenizer (lm-eval keys its request cache by it)."""
        return str(getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__).replace("/", "__")

    # ------------------------------------------------------------------------------------------------ tokenizing
    def _special_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs: Any
    ) -> list[int]:
        """Ids of ``string``; BOS is added unless ``add_special_tokens`` is False or the text already starts with the
        prefix token's text."""
        add_bos = True if add_special_tokens is None else bool(add_special_tokens)
        if add_special_tokens is None and string.startswith(self._special_text(self.prefix_token_id)):
            add_bos = False
        ids = self.tokenizer.encode(string, add_bos=add_bos, add_eos=False)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``tokens``."""
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def _encode_context(self, string: str, max_len: int) -> list[int]:
        """A generation context: BOS unless the text starts with BOS's text, left-truncated to ``max_len``."""
        bos = self.tokenizer.bos_id
        add_bos = not (bos is not None and string.startswith(self._special_text(bos)))
        return self.tokenizer.encode(string, add_bos=add_bos, add_eos=False)[-max_len:]

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation rendered with the tokenizer's chat template (or builtin chat format)."""
        from kdtune.data import Message

        messages = [Message(role=m["role"], content=m["content"]) for m in chat_history]  # type: ignore[arg-type]
        return self.tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The jinja template text (empty when the tokenizer uses a builtin format)."""
        return getattr(self.tokenizer, "chat_template", None) or ""

    # ------------------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def _log_probs(self, batch: list[list[int]]) -> torch.Tensor:
        """Right-padded ``batch`` -> fp32 log-probabilities ``[B, T, V]``."""
        width = max(len(x) for x in batch)
        tokens = torch.full((len(batch), width), self.tokenizer.pad_id, dtype=torch.long)
        for i, x in enumerate(batch):
            tokens[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        logits = self.model(tokens.to(self._device))  # [B, T, V]
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(
        self, requests: list[_Request], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """``(sum log p(continuation | context), whether greedy decoding gives the continuation)`` per request."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood requests")
        for start in range(0, len(order), self._batch_size):
            chunk = order[start : start + self._batch_size]
            inputs: list[list[int]] = []
            for i in chunk:
                _, ctx, cont = requests[i]
                if not ctx or not cont:
                    raise DataError("lm-eval request with an empty context or continuation after tokenization")
                if len(cont) > self._max_length:
                    raise DataError(
                        f"a continuation of {len(cont)} tokens is longer than max_seq_len={self._max_length}; "
                        "raise max_seq_len"
                    )
                inputs.append((ctx + cont)[-(self._max_length + 1) :][:-1])  # left-truncated, last token predicted
            log_probs = self._log_probs(inputs)  # [B, T, V]
            for row, i in enumerate(chunk):
                cont = requests[i][2]
                n = len(inputs[row])
                scored = log_probs[row, n - len(cont) : n]  # [len(cont), V]
                target = torch.tensor(cont, dtype=torch.long, device=scored.device)
                greedy = bool((scored.argmax(dim=-1) == target).all())
                results[i] = (float(scored.gather(-1, target[:, None]).sum()), greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts (perplexity tasks), in disjoint windows of ``max_length`` tokens."""
        windows: list[_Request] = []
        owners: list[int] = []
        for k, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owners.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owners, scores):
            totals[k] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---------------------------------------------------------------------------------------------- generation
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Generate for each ``(context, gen_kwargs)`` until a stop sequence, EOS or ``max_gen_toks``."""
        from kdtune.models.generation import generate

        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until requests")
        eos_text = self._special_text(self.eot_token_id)
        stop_ids = sorted(set(getattr(self.tokenizer, "stop_ids", None) or [self.eot_token_id]))
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self._max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            temperature, top_k = self._sampling(kwargs)
            max_ctx = self._max_length - max_gen_toks
            if max_ctx <= 0:
                raise ConfigError(
                    f"max_gen_toks ({max_gen_toks}) must be smaller than max_seq_len ({self._max_length}); raise "
                    "max_seq_len or lower the task's max_gen_toks"
                )
            contexts = {i: self._encode_context(requests[i].args[0], max_ctx) for i in indices}
            order = sorted(indices, key=lambda i: -len(contexts[i]))

            def stop_fn(generated: torch.Tensor, until: list[str] = until) -> torch.Tensor:
                texts = [self.tok_decode(row) for row in generated.tolist()]  # generated: [B, steps]
                return torch.tensor([any(s and s in t for s in until) for t in texts])

            for start in range(0, len(order), self._batch_size):
                chunk = order[start : start + self._batch_size]
                outputs = generate(
                    self.model, [contexts[i] for i in chunk], max_gen_toks, eos_ids=stop_ids,
                    pad_id=self.tokenizer.pad_id, temperature=temperature, top_k=top_k, generator=self._generator,
                    stop_fn=stop_fn,
                )  # fmt: skip
                for i, ids in zip(chunk, outputs):
                    results[i] = _cut_at_stop(self.tok_decode(ids), until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    @staticmethod
    def _sampling(kwargs: dict[str, Any]) -> tuple[float, int | None]:
        """``(temperature, top_k)`` from normalised gen kwargs; 0 temperature = greedy."""
        if not kwargs.get("do_sample"):
            return 0.0, None
        temperature = float(kwargs.get("temperature") or 1.0)
        top_p = kwargs.get("top_p")
        if top_p is not None and float(top_p) < 1.0:
            raise ConfigError(f"gen_kwargs: top_p={top_p} is not supported by the kdtune model; use top_k")
        top_k = kwargs.get("top_k")
        return temperature, int(top_k) if top_k else None


def _cut_at_stop(text: str, until: list[str]) -> str:
    """``text`` up to the earliest occurrence of any stop sequence."""
    cut = min((text.find(s) for s in until if s and s in text), default=len(text))
    return text[:cut]
