"""GLM-5's chat template as shipped in a checkpoint's tokenizer_config.json (Jinja), and the tools
block it renders. ``serving.chat.render_chat`` is the same template in Python; tests keep the two equal.

Format: ``[gMASK]<sop>``, role tags ``<|system|>`` ``<|user|>`` ``<|assistant|>`` ``<|observation|>``,
turn-level thinking (``enable_thinking``), preserved thinking (``clear_thinking=false``), tool calls
as ``<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value></tool_call>``.
"""

from __future__ import annotations

import json

TOOLS_HEADER = (
    "\n# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n"
)
TOOLS_FOOTER = (
    "</tools>\n\n"
    "For each function call, output the function name and arguments within the following XML format:\n"
    "<tool_call>{function-name}"
    "<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>"
    "<arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>"
    "...</tool_call>"
)


def _jinja_literal(text: str) -> str:
    return "{{- " + json.dumps(text) + " -}}"  # a JSON string is a valid Jinja string literal


# The same template as Jinja, for checkpoints' tokenizer_config.json ``chat_template`` (and for clients that
# render with transformers). Tool-call ``arguments`` must be mappings here, as vLLM passes them; the Python
# renderer also accepts the OpenAI JSON-string form. Kept equal to render_chat by tests/test_serving_chat.py.
# Edge cases follow the GLM-4.7 template: whitespace-only reasoning renders ``<think></think>``, inline
# ``</think>`` keeps the text after the last one, a tool result given as a list renders one <tool_response>
# per item (its ``output``, or the item itself).
GLM_CHAT_TEMPLATE = "".join([
    "{%- macro visible(content) -%}",
    "{%- if content is string -%}{{- content -}}",
    "{%- elif content is iterable and content is not mapping -%}",
    "{%- for part in content -%}{%- if part is string -%}{{- part -}}",
    "{%- elif part.type == 'text' -%}{{- part.text -}}{%- endif -%}{%- endfor -%}",
    "{%- endif -%}",
    "{%- endmacro -%}",
    "{%- set ns = namespace(last_user=-1) -%}",
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}",
    "{%- endfor -%}",
    "{%- set keep_all_reasoning = clear_thinking is defined and not clear_thinking -%}",
    "[gMASK]<sop>",
    "{%- if tools -%}",
    _jinja_literal("<|system|>" + TOOLS_HEADER),
    "{%- for tool in tools -%}{{- tool | tojson(ensure_ascii=False) -}}", _jinja_literal("\n"), "{%- endfor -%}",
    _jinja_literal(TOOLS_FOOTER),
    "{%- endif -%}",
    "{%- for m in messages -%}",
    "{%- set content = visible(m.content) -%}",
    "{%- if m.role == 'system' -%}{{- '<|system|>' + content -}}",
    "{%- elif m.role == 'user' -%}{{- '<|user|>' + content -}}",
    "{%- elif m.role == 'assistant' -%}",
    "{%- set reasoning = '' -%}",
    "{%- if m.reasoning_content is string -%}{%- set reasoning = m.reasoning_content -%}",
    "{%- elif '</think>' in content -%}",
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}",
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}",
    "{%- endif -%}",
    "{{- '<|assistant|>' -}}",
    "{%- if (keep_all_reasoning or loop.index0 > ns.last_user) and reasoning -%}",
    "{{- '<think>' + reasoning.strip() + '</think>' -}}",
    "{%- else -%}{{- '</think>' -}}{%- endif -%}",
    "{%- if content.strip() -%}{{- content.strip() -}}{%- endif -%}",
    "{%- for call in m.tool_calls or [] -%}",
    "{%- set fn = call.function if call.function is defined else call -%}",
    "{{- '<tool_call>' + fn.name -}}",
    "{%- for key, value in (fn.arguments or {}).items() -%}",
    "{{- '<arg_key>' + key + '</arg_key><arg_value>' -}}",
    "{%- if value is string -%}{{- value -}}{%- else -%}{{- value | tojson(ensure_ascii=False) -}}{%- endif -%}",
    "{{- '</arg_value>' -}}",
    "{%- endfor -%}",
    "{{- '</tool_call>' -}}",
    "{%- endfor -%}",
    "{%- elif m.role == 'tool' or m.role == 'observation' -%}",
    "{%- if m.content is string or m.content is none -%}",
    "{%- if loop.first or loop.previtem.role not in ['tool', 'observation'] -%}{{- '<|observation|>' -}}{%- endif -%}",
    "{{- '<tool_response>' + content + '</tool_response>' -}}",
    "{%- else -%}{{- '<|observation|>' -}}",
    "{%- for item in m.content -%}",
    "{{- '<tool_response>' -}}{{- item.output if item.output is defined else item -}}{{- '</tool_response>' -}}",
    "{%- endfor -%}",
    "{%- endif -%}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}",
    "{%- if enable_thinking is defined and not enable_thinking -%}{{- '</think>' -}}{%- else -%}{{- '<think>' -}}",
    "{%- endif -%}{%- endif -%}",
])
