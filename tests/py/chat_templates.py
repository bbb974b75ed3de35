#!/usr/bin/env python3
"""Prints how transformers renders the chat templates of cli/src/serve/chat.rs's unit test
(`apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`), the strings that
test expects. Usage: bench/.venv/bin/python tests/py/chat_templates.py"""
import json

import transformers
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}"
         "{% else %}{{ ' ' + message['content'].strip() + eos_token }}{% endif %}{% endfor %}")


def render(template, messages, **special):
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"x": 0}, unk_token="x")), **special)
    tok.chat_template = template
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


print("transformers", transformers.__version__)
print(json.dumps(render(CHATML, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Macbeth?"}],
                        eos_token="<|im_end|>")))
print(json.dumps(render(LLAMA, [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Hail."},
                                {"role": "user", "content": "Why?"}], bos_token="<s>", eos_token="</s>")))
try:
    render(LLAMA, [{"role": "assistant", "content": "x"}], bos_token="<s>", eos_token="</s>")
except Exception as e:
    print(json.dumps(str(e)))
