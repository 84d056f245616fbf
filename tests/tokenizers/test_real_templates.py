"""Chat templates with the structure of released models' templates (tool branches left out): Llama 3.1/3.2 (a system
header always emitted, date string), Qwen2.5 (default system prompt), Qwen3 (``<think>`` blocks kept only after the
last user turn, so a conversation prefix renders differently from the same turns inside the whole conversation).
Ids must equal ``apply_chat_template``; masks are checked by hand."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest

from kdtune.data import Message, load_hf_tokenizer, mask_messages

transformers = pytest.importorskip("transformers")

LLAMA3_1 = (
    "{{- bos_token }}\n"
    '{%- if not date_string is defined %}\n    {%- set date_string = "26 Jul 2024" %}\n{%- endif %}\n'
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n"
    '{%- else %}\n    {%- set system_message = "" %}\n{%- endif %}\n'
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    '{{- system_message }}\n{{- "<|eot_id|>" }}\n'
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"
)
QWEN2_5 = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
QWEN3 = (
    "{%- if messages[0].role == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    '    {%- if ns.multi_step_tool and message.role == "user" %}\n'
    "        {%- set ns.multi_step_tool = false %}\n        {%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {%- set content = message.content %}\n        {%- set reasoning_content = '' %}\n"
    "        {%- if '</think>' in message.content %}\n"
    "            {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}\n"
    "            {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}\n"
    "        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    "            {%- else %}\n                {{- '<|im_start|>' + message.role + '\\n' + content }}\n            {%- endif %}\n"
    "        {%- else %}\n            {{- '<|im_start|>' + message.role + '\\n' + content }}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n"
    "{%- endif %}"
)

CONV = [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "Times 10?"},
    {"role": "assistant", "content": "40"},
]


def _with_template(tmp_path, src, template, name):
    d = tmp_path / name
    shutil.copytree(src, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def _ref(d, conv, agp=False, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.AutoTokenizer.from_pretrained(str(d))
    out = ref.apply_chat_template(conv, tokenize=True, add_generation_prompt=agp, **kw)
    return list(out) if isinstance(out, list) else list(out["input_ids"])


def _trained(ids, mask):
    return [i for i, m in zip(ids, mask) if not m]


@pytest.mark.parametrize(
    ("name", "base", "template"),
    [("llama3_1", "llama3", LLAMA3_1), ("qwen2_5", "qwen2", QWEN2_5), ("qwen3", "qwen2", QWEN3)],
    ids=["llama3_1", "qwen2_5", "qwen3"],
)
def test_release_style_templates(tmp_path, tok_dirs, name, base, template):
    d = _with_template(tmp_path, tok_dirs[base], template, name)
    tok = load_hf_tokenizer(d)
    end = tok.token_to_id("<|eot_id|>" if base == "llama3" else "<|im_end|>")

    def enc(s):
        return tok.encode(s, add_bos=False, add_eos=False)

    for conv in (CONV, CONV[1:]):
        msgs = mask_messages([Message.from_dict(m) for m in conv])
        ids, mask = tok.tokenize_messages(msgs)
        assert ids == _ref(d, conv), name
        # both assistant turns are trained (content + end-of-turn), nothing else; Qwen3 renders the final turn with
        # an (empty) think block, which is part of what the model generates, so it is trained too
        last = "<think>\n\n</think>\n\n40" if name == "qwen3" else "40"
        assert _trained(ids, mask) == enc("4") + [end] + enc(last) + [end], name
        ids, mask = tok.tokenize_messages(msgs[:-1], add_generation_prompt=True)
        assert ids == _ref(d, conv[:-1], agp=True)
        assert _trained(ids, mask) == enc("4") + [end]


def test_qwen3_think_block_follows_the_generation_prompt(tmp_path, tok_dirs):
    d = _with_template(tmp_path, tok_dirs["qwen2"], QWEN3, "qwen3")
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    msgs = mask_messages([Message.from_dict(m) for m in conv])
    # default: the final turn renders as "<think>\n\n</think>\n\nHello<|im_end|>" and the generation prompt is only
    # the header, so the model must generate the empty think block: it is trained
    tok = load_hf_tokenizer(d)
    ids, mask = tok.tokenize_messages(msgs)
    assert ids == _ref(d, conv)
    assert tok.decode(_trained(ids, mask), skip_special_tokens=False) == "<think>\n\n</think>\n\nHello<|im_end|>"
    # enable_thinking=False (template_kwargs reach the template): the empty think block is part of the generation
    # prompt, so it is prompt (masked) and only the answer is trained
    tok = load_hf_tokenizer(d, template_kwargs={"enable_thinking": False})
    ids, mask = tok.tokenize_messages(msgs)
    assert ids == _ref(d, conv, enable_thinking=False)
    assert tok.decode(_trained(ids, mask), skip_special_tokens=False) == "Hello<|im_end|>"
    ids, mask = tok.tokenize_messages(msgs[:1], add_generation_prompt=True)
    assert ids == _ref(d, conv[:1], agp=True, enable_thinking=False)
    assert tok.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
