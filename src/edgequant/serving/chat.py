"""Chat prompts from the model's own Jinja template, rendered in a sandbox."""

from __future__ import annotations

from edgequant.runner import Runner
from edgequant.serving.errors import ApiError


def render_chat(runner: Runner, messages: list[dict]) -> str:
    template = runner.chat_template()
    if not template:  # no template shipped: a plain, documented fallback
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token="", eos_token="")
    except TemplateError as exc:
        raise ApiError(400, f"the model's chat template rejected the messages: {exc}", param="messages") from None
