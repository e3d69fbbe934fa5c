"""Chat formats, the one owner of how a conversation becomes text: a model's Jinja template when it
ships one, else the Llama 3 or Llama 2 format. Inference renders a prompt ending with an open
assistant turn; fine-tuning renders whole conversations *with the character spans of each assistant
turn*, which :mod:`jaxllama.data.chat_data` turns into an exact token-level loss mask.

Which format (``--chat``, ``data.chat_template``, ``template="auto"``): the checkpoint's Jinja
template (``tokenizer_config.json``, ``chat_template.jinja`` or GGUF metadata, as Hugging Face's
``apply_chat_template`` would use it); otherwise Llama 3's header tokens when the tokenizer has
``<|start_header_id|>``, else Llama 2's ``[INST]``. The rendered text contains special-token strings,
so it is encoded with ``special=True``.

Assistant spans in a Jinja template come from its ``{% generation %}`` ... ``{% endgeneration %}``
tags, as in transformers. A template without them (Meta's stock Llama 3.1 one) is not silently
trained on nothing, the common bug: each assistant turn's span is the text that rendering the
conversation up to and including that turn adds to rendering it up to the turn's generation prompt
(a template for which that is not a prefix is an error asking for the tags).

A template is code from a downloaded checkpoint, so a render has a budget as well as a sandbox: each
loop iteration and each call is a step (at most ``MAX_STEPS``, plus a few per message), the output
is at most ``MAX_OUTPUT`` characters plus a few times the conversation's, ``*`` and ``**`` refuse
results past those bounds, and deep recursion or any Python error inside the template is a one-line
:class:`ConfigError` like a Jinja error, never a hang, a traceback or gigabytes of memory.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from jaxllama.config_checks import cut, short
from jaxllama.errors import ConfigError

TEMPLATES = ("auto", "jinja", "llama3", "llama2")
ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]
MAX_STEPS = 250_000  # loop iterations + calls per render; a stock template takes tens per message
STEPS_PER_MESSAGE = 1_000
MAX_OUTPUT = 1 << 20  # characters per render, plus OUTPUT_PER_CHAR per character of the messages
OUTPUT_PER_CHAR = 8
_BUDGET_NAME = "__jaxllama_budget"  # the global that every {% for %} iterable passes through


@dataclass
class Rendered:
    """A rendered conversation: its text and the ``[start, end)`` character spans of each assistant turn
    (content and end-of-turn marker, never the generation prompt), in order."""

    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)


def messages_for(prompt: str, system: str | None = None) -> Messages:
    """One user turn (after an optional system turn)."""
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}]


class _Builder:
    def __init__(self):
        self.parts: list[str] = []
        self.spans: list[tuple[int, int]] = []
        self.n = 0

    def add(self, text: str, trained: bool = False) -> None:
        if trained:
            self.spans.append((self.n, self.n + len(text)))
        self.parts.append(text)
        self.n += len(text)

    def done(self) -> Rendered:
        return Rendered("".join(self.parts), self.spans)


def render_llama3(messages: Messages, add_generation_prompt: bool = True, bos: str = "<|begin_of_text|>") -> Rendered:
    """Meta's Llama 3 chat format; an assistant span is its content and ``<|eot_id|>``."""
    out = _Builder()
    out.add(bos)
    for m in messages:
        out.add(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n")
        out.add(f"{m['content'].strip()}<|eot_id|>", trained=m["role"] == "assistant")
    if add_generation_prompt:
        out.add("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return out.done()


def render_llama2(messages: Messages, add_generation_prompt: bool = True, bos: str = "<s>",
                  eos: str = "</s>") -> Rendered:
    """Meta's Llama 2 chat format: ``<s>[INST] <<SYS>>...<</SYS>> user [/INST] answer </s>`` per turn;
    an assistant span is `` answer </s>`` (Meta encodes each turn as ``f"[INST] {u} [/INST] {a} "``)."""
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    out = _Builder()
    for i, m in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ConfigError(f"chat: message {i + 1 + (system is not None)} should be from the {want} in the "
                              f"Llama 2 format (user and assistant alternate), got {m['role']!r}")
        if want == "user":
            text = m["content"].strip()
            if i == 0 and system:
                text = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{text}"
            out.add(f"{bos}[INST] {text} [/INST]")
        else:
            out.add(f" {m['content'].strip()} {eos}", trained=True)
    return out.done()


def llama3_prompt(messages: Messages, bos: str = "<|begin_of_text|>") -> str:
    """The Llama 3 prompt text, ending with an open assistant header."""
    return render_llama3(messages, True, bos).text


def llama2_prompt(messages: Messages, bos: str = "<s>", eos: str = "</s>") -> str:
    return render_llama2(messages, True, bos, eos).text


# -- Jinja ---------------------------------------------------------------------------------------

_STATE = threading.local()  # the render in progress: output length so far, the generation spans, the budget


def _step(line: int | None = None) -> None:
    """Count one step of the render in progress; past its budget the render stops with one line."""
    state = getattr(_STATE, "render", None)
    if state is None:
        return
    state["steps"] += 1
    if state["steps"] > state["max_steps"]:
        where = f" line {line}" if line else ""
        raise ConfigError(f"chat template{where}: rendering stopped after {state['max_steps']} loop steps and "
                          "calls (its budget; no chat format needs that many)")


def _budgeted(iterable: Any, line: int = 0) -> Any:
    """What every ``{% for %}`` iterates: the template's iterable, one step per item."""
    for item in iterable:
        _step(line)
        yield item


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """``"x" * 10**9`` or ``10 ** 10 ** 9`` would take the memory or the CPU before any step is counted."""
    limit = MAX_OUTPUT * OUTPUT_PER_CHAR
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > limit:
                raise ConfigError(f"chat template: {operator!r} would make a value of {len(seq) * n} items "
                                  f"(more than {limit})")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
            right * abs(left).bit_length() > 1 << 16:
        raise ConfigError(f"chat template: {short(left, 40)} ** {short(right, 40)} is too large a number")


def _environment():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}``: records where its output lands in the text."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark", []), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            state = getattr(_STATE, "render", None)
            if state is not None:  # output so far has been consumed from the generator: its length is known
                state["spans"].append((state["pos"], text))
            return text

    def raise_exception(message):
        raise ConfigError(f"chat template: {cut(' '.join(str(message).split()))}")

    class Budgeted(ImmutableSandboxedEnvironment):
        """The sandbox, counting steps: every call, and every loop item (the parsed ``{% for %}``
        iterables are wrapped in ``_budgeted``), and bounding ``*`` and ``**``."""

        intercepted_binops = frozenset({"*", "**"})

        def _parse(self, source, name, filename):
            tree = super()._parse(source, name, filename)
            for loop in tree.find_all(nodes.For):
                loop.iter = nodes.Call(nodes.Name(_BUDGET_NAME, "load"), [loop.iter, nodes.Const(loop.lineno)],
                                       [], None, None).set_lineno(loop.lineno)
            return tree

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own signature)
            _step()
            return super().call(__context, __obj, *args, **kwargs)

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

    env = Budgeted(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", Generation])
    env.globals[_BUDGET_NAME] = _budgeted
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)  # Llama 3.1+
    env.filters.setdefault("tojson", lambda x, **kw: json.dumps(x, **kw))
    return env, jinja2


_COMPILED: dict[str, Any] = {}


def _template(source: str):
    if source not in _COMPILED:
        env, jinja2 = _environment()
        try:
            _COMPILED[source] = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"chat template line {e.lineno}: not valid Jinja ({_one(e)})") from None
        except jinja2.TemplateError as e:
            raise ConfigError(f"chat template: not valid Jinja ({_one(e)})") from None
        except RecursionError:  # nesting deeper than the parser's recursion
            raise ConfigError("chat template: not valid Jinja (nested too deeply)") from None
        except Exception as e:  # noqa: BLE001 (Python's own compiler: too many nested blocks, ...)
            raise ConfigError(f"chat template: not valid Jinja ({type(e).__name__}: {_one(e)})") from None
    return _COMPILED[source]


def _render(source: str, messages: Messages, tokenizer: Any, add_generation_prompt: bool) -> tuple[str, list]:
    import jinja2

    specials = {v: k for k, v in tokenizer.special_ids().items()}
    template = _template(source)
    chars = sum(len(m.get("content") or "") for m in messages if isinstance(m, dict))
    max_out = MAX_OUTPUT + OUTPUT_PER_CHAR * chars
    _STATE.render = state = {"pos": 0, "spans": [], "steps": 0,
                             "max_steps": MAX_STEPS + STEPS_PER_MESSAGE * len(messages)}
    parts: list[str] = []
    try:
        for chunk in template.generate(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=specials.get(tokenizer.bos_id, "") if tokenizer.bos_id is not None else "",
                eos_token=specials.get(tokenizer.eos_id, "") if tokenizer.eos_id is not None else ""):
            parts.append(chunk)
            state["pos"] += len(chunk)
            if state["pos"] > max_out:
                raise ConfigError(f"chat template: rendering stopped at {max_out} characters (its budget: "
                                  f"{MAX_OUTPUT} plus {OUTPUT_PER_CHAR} per character of the messages)")
    except ConfigError:
        raise
    except jinja2.TemplateError as e:
        line = f" line {e.lineno}" if getattr(e, "lineno", None) else ""
        raise ConfigError(f"chat template{line}: cannot render it ({_one(e)})") from None
    except RecursionError:
        raise ConfigError("chat template: cannot render it (it recurses too deeply)") from None
    except Exception as e:  # noqa: BLE001 (template code can raise anything: 1/0, "a" + 1, int("x"))
        raise ConfigError(f"chat template: cannot render it ({type(e).__name__}: {_one(e)})") from None
    finally:
        _STATE.render = None
    return "".join(parts), state["spans"]


def _one(e: BaseException) -> str:
    """An exception's message, the first line only (Jinja adds the template's source), cut."""
    text = getattr(e, "message", None) or str(e)
    return cut(text.splitlines()[0] if text.strip() else type(e).__name__)


def render_jinja(template: str, messages: Messages, tokenizer: Any) -> str:
    """Render a Hugging Face chat template (sandboxed Jinja, ``add_generation_prompt=True``)."""
    return _render(template, messages, tokenizer, True)[0]


def render_jinja_spans(template: str, messages: Messages, tokenizer: Any) -> Rendered:
    """A whole conversation through a Jinja template, with its assistant spans (see the module docstring)."""
    text, marked = _render(template, messages, tokenizer, False)
    if re.search(r"{%-?\s*generation\s*-?%}", template):  # the template's own tags decide (none reached: no spans)
        spans = []
        for start, piece in marked:
            if text[start:start + len(piece)] != piece:  # inside a block Jinja buffers (a macro, a set block)
                raise ConfigError("chat template: a {% generation %} block is inside a construct whose output "
                                  "Jinja buffers (a macro or set block), so its position is unknown")
            spans.append((start, start + len(piece)))
        return Rendered(text, spans)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(template, messages[:i], tokenizer, True)[0]
        upto = _render(template, messages[: i + 1], tokenizer, False)[0]
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ConfigError(f"chat template: rendering the conversation turn by turn does not give prefixes of "
                              f"the whole (at message {i + 1}), so the assistant tokens cannot be found; add "
                              "{% generation %} ... {% endgeneration %} around the assistant output")
        spans.append((len(before), len(upto)))
    return Rendered(text, spans)


def auto_format(tokenizer: Any, jinja: str | None = None) -> str:
    """What ``--chat-template auto`` uses: the model's Jinja template when it has one, else the
    Llama 3 header format when the tokenizer has its tokens, else Llama 2's ``[INST]``."""
    if jinja or getattr(tokenizer, "chat_template", None):
        return "jinja"
    return "llama3" if "<|start_header_id|>" in tokenizer.special_ids() else "llama2"


def resolve_format(tokenizer: Any, template: str = "auto", jinja: str | None = None,
                   key: str = "--chat-template") -> tuple[str, str | None]:
    """(format, Jinja source or None) after checking the tokenizer has what the format needs."""
    if template not in TEMPLATES:
        raise ConfigError(f"{key}: {template!r} is not one of {', '.join(TEMPLATES)}")
    jinja = jinja or getattr(tokenizer, "chat_template", None)
    specials = tokenizer.special_ids()
    template = auto_format(tokenizer, jinja) if template == "auto" else template
    if template == "jinja" and not jinja:
        raise ConfigError(f"{key} jinja: the model and tokenizer carry no chat template")
    if template == "llama3":
        for name in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
            if name not in specials:
                raise ConfigError(f"{key} llama3: the tokenizer has no {name} token")
    return template, jinja if template == "jinja" else None


def render_chat(messages: Messages, tokenizer: Any, template: str = "auto", jinja: str | None = None,
                add_generation_prompt: bool = True, key: str = "--chat-template") -> Rendered:
    """``messages`` in the chosen format; with ``add_generation_prompt=False`` (training) the whole
    conversation with its assistant spans."""
    fmt, source = resolve_format(tokenizer, template, jinja, key)
    if fmt == "jinja":
        if add_generation_prompt:
            return Rendered(render_jinja(source, messages, tokenizer))
        return render_jinja_spans(source, messages, tokenizer)
    if fmt == "llama3":
        return render_llama3(messages, add_generation_prompt)
    names = {v: k for k, v in tokenizer.special_ids().items()}
    return render_llama2(messages, add_generation_prompt, names.get(tokenizer.bos_id, "<s>"),
                         names.get(tokenizer.eos_id, "</s>"))


def chat_prompt(messages: Messages, tokenizer: Any, template: str = "auto", jinja: str | None = None) -> str:
    """The prompt text for ``messages`` in the chosen format (see the module docstring for ``auto``)."""
    return render_chat(messages, tokenizer, template, jinja).text
