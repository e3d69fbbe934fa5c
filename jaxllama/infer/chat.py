"""Chat prompts: a model's Jinja template when it ships one, else the Llama 3 or Llama 2 format.

Which one (``--chat``, ``template="auto"``): the checkpoint's Jinja template (``tokenizer_config.json``,
``chat_template.jinja`` or GGUF metadata, as Hugging Face's ``apply_chat_template`` would use it);
otherwise Llama 3's header tokens when the tokenizer has ``<|start_header_id|>``, else Llama 2's
``[INST]``. The rendered text contains special-token strings, so it is encoded with ``special=True``.
"""

from __future__ import annotations

from typing import Any

from jaxllama.errors import ConfigError

TEMPLATES = ("auto", "jinja", "llama3", "llama2")
Messages = list[dict[str, str]]


def messages_for(prompt: str, system: str | None = None) -> Messages:
    """One user turn (after an optional system turn)."""
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}]


def llama3_prompt(messages: Messages, bos: str = "<|begin_of_text|>") -> str:
    """Meta's Llama 3 chat format, ending with an open assistant header."""
    parts = [bos]
    for m in messages:
        parts.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>")
    parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


def llama2_prompt(messages: Messages, bos: str = "<s>", eos: str = "</s>") -> str:
    """Meta's Llama 2 chat format: ``<s>[INST] <<SYS>>...<</SYS>> user [/INST] answer </s>`` per turn."""
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    out = []
    for i in range(0, len(messages), 2):
        user = messages[i]
        if user["role"] != "user":
            raise ConfigError(f"chat: message {i + 1} should be from the user, got {user['role']!r}")
        text = user["content"].strip()
        if i == 0 and system:
            text = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{text}"
        turn = f"{bos}[INST] {text} [/INST]"
        if i + 1 < len(messages):
            turn += f" {messages[i + 1]['content'].strip()} {eos}"
        out.append(turn)
    return "".join(out)


def render_jinja(template: str, messages: Messages, tokenizer: Any) -> str:
    """Render a Hugging Face chat template (sandboxed Jinja, ``add_generation_prompt=True``)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ConfigError(f"chat template: {message}")

    specials = {v: k for k, v in tokenizer.special_ids().items()}
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)  # Llama 3.1+
    env.filters.setdefault("tojson", lambda x, **kw: __import__("json").dumps(x, **kw))
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=True,
            bos_token=specials.get(tokenizer.bos_id, "") if tokenizer.bos_id is not None else "",
            eos_token=specials.get(tokenizer.eos_id, "") if tokenizer.eos_id is not None else "")
    except jinja2.TemplateError as e:
        raise ConfigError(f"chat template: cannot render it ({e})") from None


def auto_format(tokenizer: Any, jinja: str | None = None) -> str:
    """What ``--chat-template auto`` uses: the model's Jinja template when it has one, else the
    Llama 3 header format when the tokenizer has its tokens, else Llama 2's ``[INST]``."""
    if jinja or getattr(tokenizer, "chat_template", None):
        return "jinja"
    return "llama3" if "<|start_header_id|>" in tokenizer.special_ids() else "llama2"


def chat_prompt(messages: Messages, tokenizer: Any, template: str = "auto", jinja: str | None = None) -> str:
    """The prompt text for ``messages`` in the chosen format (see the module docstring for ``auto``)."""
    if template not in TEMPLATES:
        raise ConfigError(f"--chat-template: {template!r} is not one of {', '.join(TEMPLATES)}")
    jinja = jinja or getattr(tokenizer, "chat_template", None)
    specials = tokenizer.special_ids()
    template = auto_format(tokenizer, jinja) if template == "auto" else template
    if template == "jinja":
        if not jinja:
            raise ConfigError("--chat-template jinja: the model and tokenizer carry no chat template")
        return render_jinja(jinja, messages, tokenizer)
    if template == "llama3":
        for name in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
            if name not in specials:
                raise ConfigError(f"--chat-template llama3: the tokenizer has no {name} token")
        return llama3_prompt(messages)
    bos = {v: k for k, v in specials.items()}.get(tokenizer.bos_id, "<s>")
    eos = {v: k for k, v in specials.items()}.get(tokenizer.eos_id, "</s>")
    return llama2_prompt(messages, bos, eos)
