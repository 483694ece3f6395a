"""Conversations: what a chat / instruction / preference row holds, and how a chat template turns it into
tokens whose labels are the assistant's turns only.

    chat.conversation(value)                 # a row's `messages` -> [{role, content}, ...] (ShareGPT mapped)
    chat.set_template(tokenizer, "chatml")   # a named template (or a Jinja string) saved into the tokenizer
    chat.encode(tokenizer, messages, 512)    # (input_ids, labels): -100 except assistant content + end of turn

Rows (a data card's roles):
    messages                    a list of turns {role, content}, roles system / user / assistant (OpenAI style);
                                ShareGPT's {from, value} with human / gpt / system is accepted and mapped
    prompt + completion         an instruction and its answer (strings)
    prompt + chosen + rejected  a preference pair: strings, or message lists (the prompt's turns; chosen and
                                rejected the assistant's reply)

Assistant-only labels come from the template itself, with no `{% generation %}` markers needed: the
conversation is rendered once whole, and the characters of assistant turn k are those between the rendering of
turns [:k] with the generation prompt and the rendering of turns [:k+1] (trailing whitespace excluded), so
they hold the turn's content and its end-of-turn marker (ChatML's <|im_end|>). Tokens overlapping those
characters keep their labels. A template for which the renderings are not prefixes of each other is refused.
"""

from __future__ import annotations

from typing import Any

from pipelines.errors import PipelinesError

TURN_ROLES = ("system", "user", "assistant")
# ShareGPT (and a few other dumps) name the speakers differently
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant"}

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# name -> (Jinja template, special tokens it needs, its end-of-turn token)
TEMPLATES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "chatml": (CHATML, ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
}
_PROBE = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
          {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2"}]


class ConversationError(ValueError):
    """A row that is not a valid conversation; the data layer adds the file, the row and the column."""


# ---------------------------------------------------------------- rows


def conversation(value: Any, *, need_assistant: bool = True, what: str = "messages") -> list[dict]:
    """A row's message list as [{role, content}] with roles system / user / assistant, checked: a list of turns,
    each a mapping with a known role and non-empty text content; at most one system turn, and first; at least
    one assistant turn when `need_assistant`."""
    if not isinstance(value, (list, tuple)):
        raise ConversationError(f"{what} should be a list of turns {{role, content}}, got {type(value).__name__}")
    if not value:
        raise ConversationError(f"{what} is an empty list of turns")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise ConversationError(f"{what}[{i}] should be a turn {{role, content}}, got {turn!r}")
        present = {k: v for k, v in turn.items() if v is not None}
        role, content = present.get("role", present.get("from")), present.get("content", present.get("value"))
        if role is None or "content" not in present and "value" not in present:
            raise ConversationError(f"{what}[{i}] has keys {sorted(present)}; a turn needs role + content "
                                    "(or ShareGPT's from + value)")
        role = ROLE_ALIASES.get(str(role).strip().lower(), str(role).strip().lower())
        if role not in TURN_ROLES:
            raise ConversationError(f"{what}[{i}]: unknown role {turn.get('role', turn.get('from'))!r}; expected one of "
                                    f"{list(TURN_ROLES)} (ShareGPT: human, gpt, system)")
        if not isinstance(content, str):
            raise ConversationError(f"{what}[{i}] ({role}): content should be text, got {content!r}")
        if not content.strip():
            raise ConversationError(f"{what}[{i}] ({role}): empty turn")
        turns.append({"role": role, "content": content.strip()})
    systems = [i for i, t in enumerate(turns) if t["role"] == "system"]
    if len(systems) > 1:
        raise ConversationError(f"{what}: {len(systems)} system turns (at {systems}); a conversation has at most one")
    if systems and systems[0] != 0:
        raise ConversationError(f"{what}[{systems[0]}]: the system turn must come first")
    if need_assistant and not any(t["role"] == "assistant" for t in turns):
        raise ConversationError(f"{what}: no assistant turn (nothing to learn)")
    return turns


def reply(value: Any, what: str) -> list[dict]:
    """A preference pair's chosen / rejected side given as a message list: assistant turns only."""
    turns = conversation(value, what=what)
    bad = [i for i, t in enumerate(turns) if t["role"] != "assistant"]
    if bad:
        raise ConversationError(f"{what}[{bad[0]}]: a reply holds assistant turns only (the prompt holds the rest)")
    return turns


def same_reply(a, b) -> bool:
    norm = (lambda v: v.strip() if isinstance(v, str) else [(t["role"], t["content"].strip()) for t in v])  # noqa: E731
    return norm(a) == norm(b)


# ---------------------------------------------------------------- templates


def set_template(tokenizer, spec: str) -> list[str]:
    """Give the tokenizer a chat template: a named one (its special tokens added) or a Jinja string. Saved with
    the tokenizer, so the model serves with it. Returns notes for the log."""
    notes = []
    if spec in TEMPLATES:
        template, specials, eot = TEMPLATES[spec]
        missing = [t for t in specials if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": list(specials)}, replace_extra_special_tokens=False)
            notes.append(f"chat template {spec}: added the special tokens {missing} to the tokenizer")
        tokenizer.chat_template = template
    else:
        tokenizer.chat_template = spec
    check_template(tokenizer)
    return notes


def template_problem(spec: str) -> str | None:
    """Whether a recipe's `chat_template` value can be a template (named, or Jinja that renders a conversation)."""
    if spec in TEMPLATES:
        return None
    if "{" not in spec:
        return f"{spec!r} is neither a named template ({', '.join(TEMPLATES)}) nor a Jinja template"
    try:
        from transformers.utils.chat_template_utils import render_jinja_template

        render_jinja_template(conversations=[_PROBE], chat_template=spec)
    except Exception as e:  # jinja2's TemplateSyntaxError / UndefinedError / ...
        return f"the Jinja template does not render a conversation: {type(e).__name__}: {e}"
    return None


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def check_template(tokenizer) -> None:
    """The tokenizer has a chat template whose renderings of a conversation's first turns are prefixes of the
    whole, and which ends an assistant turn with something (else the model never learns to stop)."""
    if not getattr(tokenizer, "chat_template", None):
        raise PipelinesError("the tokenizer has no chat template: set `chat_template: chatml` (or a Jinja string) in "
                             "the tokenizer stage or in this stage")
    try:
        spans(tokenizer, _PROBE)
    except PipelinesError:
        raise
    except Exception as e:
        raise PipelinesError(f"the chat template does not render a conversation: {type(e).__name__}: {e}") from None
    if not end_of_turn(tokenizer):
        raise PipelinesError("the chat template ends an assistant turn with nothing (no end-of-turn token, no EOS): "
                             "a model trained on it never learns to stop; end each turn with a token, e.g. eos_token")


def end_of_turn(tokenizer) -> str:
    """What the template writes after an assistant turn's content (ChatML: <|im_end|>), stripped."""
    text = render(tokenizer, _PROBE[:3])
    return text[text.rindex("A1") + 2:].strip()


def end_of_turn_id(tokenizer) -> int | None:
    """The token id that ends an assistant turn, when the end-of-turn marker is one token (generation stops there)."""
    ids = tokenizer(end_of_turn(tokenizer), add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def spans(tokenizer, messages: list[dict], learn_from: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [(start, end) characters of each assistant turn from turn `learn_from` on:
    content + end of turn])."""
    text = render(tokenizer, messages)
    out = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant" or k < learn_from:
            continue
        before, upto = render(tokenizer, messages[:k], add_generation_prompt=True), render(tokenizer, messages[: k + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise PipelinesError("the chat template renders a conversation's first turns differently from the whole "
                                 "(not a prefix): assistant turns cannot be located for the loss mask; use chatml")
        end = len(upto.rstrip())
        out.append((len(before), max(end, len(before))))
    return text, out


# ---------------------------------------------------------------- tokens


def encode(tokenizer, messages: list[dict], max_length: int, learn_from: int = 0) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) of a conversation: labels are -100 except the assistant turns' tokens (content and
    end-of-turn marker; from turn `learn_from` on: a preference pair's reply after its prompt). Longer than
    max_length: cut after the last assistant turn that fits whole (a turn is never left without its end); None
    when not even the first one fits."""
    text, turns = spans(tokenizer, messages, learn_from)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels, ends = [-100] * len(ids), []
    j = 0
    for s, e in turns:
        last = None
        for i in range(j, len(ids)):
            a, b = offsets[i]
            if b <= s:
                continue
            if a >= e:
                break
            labels[i], last = ids[i], i
        if last is not None:
            ends.append(last + 1)
            j = last + 1
    if len(ids) > max_length:
        fit = [n for n in ends if n <= max_length]
        if not fit:
            return None
        ids, labels = ids[: fit[-1]], labels[: fit[-1]]
    return ids, labels


def as_messages(row: dict) -> list[dict]:
    """A chat / instruction row as a conversation: `messages`, or `prompt` + `completion` as a user and an
    assistant turn."""
    if "messages" in row:
        return row["messages"]
    prompt = row["prompt"]
    turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return [*turns, {"role": "assistant", "content": row["completion"]}]


def prompt_messages(row: dict) -> list[dict]:
    """The turns before a conversation's last assistant turn (what the model answers when it is evaluated)."""
    msgs = as_messages(row)
    return msgs[: _last_assistant(msgs)]


def last_reply(row: dict) -> str:
    """The content of a conversation's last assistant turn (the reference reply)."""
    msgs = as_messages(row)
    return msgs[_last_assistant(msgs)]["content"]


def _last_assistant(msgs: list[dict]) -> int:
    return max(i for i, t in enumerate(msgs) if t["role"] == "assistant")
