"""RecurrentGPT: a language-based long-short-term memory loop around any text generator.

Zhou, Jiang, Cui, Wang, Xiao, Hou, Cotterell & Sachan, 2023, "RecurrentGPT: Interactive
Generation of (Arbitrarily) Long Text" (arXiv:2305.13304). The paper replaces the vectors
of an LSTM (input, hidden state, cell state, output) by natural-language text and runs the
recurrence by prompting a language model: one call per time step, one paragraph per call,
so the text can grow without bound while every prompt stays the same size.

**State** at step ``t`` (:class:`LoopState`)::

    x_t   the paragraph just written (``x_0``: the user's opening)
    h_t   short-term memory: a few sentences of key information from recent steps
    p_t   plan: the instruction for what to write next
    M_t   long-term memory: the paragraphs ``x_0 .. x_{t-1}`` with their embeddings e(x)

**Step** (:func:`recurrent_step`) with a generator ``g: prompt -> output`` (any callable
``str -> str``: an LLM API, our character LM, a scripted fake)::

    q_t       = e(h_t + "\\n" + p_t)                                 the retrieval query
    R_t       = top_k over m in M_t of cos(q_t, e(m))               semantic search (ties: older first)
    prompt_t  = template(R_t, h_t, x_t, p_t)
    y_t       = g(prompt_t)
    x_{t+1}, h_{t+1}, p_{t+1} = parse(y_t; fallback h_t, p_t)
    M_{t+1}   = M_t + [x_t]                                         the paragraph that left the prompt is archived

The prompt asks for three sections (:data:`PAPER_TEMPLATE`, the paper's input and output
format): ``Output Paragraph:``, ``Output Memory:`` (a rationale, then ``Updated Memory:``)
and ``Output Instruction:`` (``Instruction 1:`` .. ``Instruction 3:``, three possible
continuations). :func:`parse_output` reads each section independently; when the generator
does not follow the format (a small or character-level model never does) the **fallback**
is: the paragraph is the whole output (stripped); the short-term memory is extractive,
:func:`lead_line_memory` (the first line of the new paragraph appended to ``h_t``, the
newest ``short_memory_chars`` characters kept, whole lines); the plan stays ``p_t``. Of
the three offered instructions the first is taken (the paper lets a human, or an LLM
simulating one, choose).

**Embedding** (:func:`embed`): the paper uses a sentence-transformer; here a deterministic,
dependency-free stand-in, hashed character n-gram counts, L2-normalised::

    e(s)[j] = c_j / ||c||,   c_j = #{n-grams g of norm(s) : crc32(g) mod dim = j}

with ``norm(s)`` = lower case, whitespace runs collapsed to one space, one space added at
each end (``e = 0`` when ``norm(s)`` is shorter than ``n``). So ``cos(a, b) = e(a) . e(b)``.

Departures from the paper (and its code, github.com/aiwaves-cn/RecurrentGPT): the long-term
memory stores the paragraphs themselves (as the official code does), not LLM-written
summaries; the query is ``h_t`` and ``p_t`` together (the code queries with the plan alone,
which our character LM never rewrites); a generator that ignores the format is not re-asked
(the code retries until it parses) but handled by the fallback above; each part of the
prompt can be cut to a character budget (:class:`LoopConfig`) so it fits a small model's
context. Everything here is plain Python and numpy: the loop is host-side control flow
around whatever ``generate`` computes.
"""

from __future__ import annotations

import dataclasses
import re
import string
import zlib
from collections.abc import Callable, Sequence

import numpy as np
from jaxtyping import Float

from ssmjax.checks import check_choice, check_positive_int

Generate = Callable[[str], str]

PROMPT_FIELDS = ("memories", "short_memory", "paragraph", "plan")
RETRIEVALS = ("cosine", "recent")


# ----------------------------------------------------------------------------- embedding


def normalize_text(text: str) -> str:
    """Lower case, whitespace runs -> one space, one space at each end (:func:`embed`)."""
    return " " + " ".join(text.lower().split()) + " "


def embed(text: str, dim: int = 1024, ngram: int = 3) -> Float[np.ndarray, " dim"]:
    """``[dim]`` float64: hashed character ``ngram`` counts of ``text``, unit L2 norm (module
    docstring); all zeros when the normalised text has fewer than ``ngram`` characters."""
    check_positive_int("dim", dim)
    check_positive_int("ngram", ngram)
    chars = normalize_text(text)
    counts = np.zeros(dim, np.float64)
    for i in range(len(chars) - ngram + 1):
        counts[zlib.crc32(chars[i:i + ngram].encode("utf-8")) % dim] += 1.0
    norm = np.linalg.norm(counts)
    return counts / norm if norm > 0 else counts


def retrieve(query: Float[np.ndarray, " dim"], keys: Float[np.ndarray, "n dim"], k: int) -> list[tuple[int, float]]:
    """The ``min(k, n)`` rows of ``keys`` (unit vectors) most cosine-similar to ``query``, as
    ``(row, cosine)`` from the most similar; equal scores keep the lower row (the older
    memory) first."""
    if k < 0:
        raise ValueError(f"k: expected >= 0, got {k}")
    if keys.ndim != 2 or keys.shape[1] != query.shape[0]:
        raise ValueError(f"keys: expected [n, {query.shape[0]}] (the query's dim), got {keys.shape}")
    scores = keys @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return [(int(i), float(scores[i])) for i in order]


# ----------------------------------------------------------------------------- prompt


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """``body``: a ``str.format`` string over the fields :data:`PROMPT_FIELDS`; the retrieved
    memories fill ``{memories}``, each formatted by ``memory_item`` (fields ``index``, from 1,
    and ``text``) and joined by ``memory_separator``."""

    body: str
    memory_item: str = "{text}"
    memory_separator: str = "\n"

    def __post_init__(self):
        for name, text, allowed in (("body", self.body, PROMPT_FIELDS), ("memory_item", self.memory_item,
                                                                         ("index", "text"))):
            used = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
            if not used <= set(allowed):
                raise ValueError(f"template {name}: unknown field(s) {sorted(used - set(allowed))}; "
                                 f"expected fields among {allowed}")


PAPER_TEMPLATE = PromptTemplate(
    body=("We are writing a long story together, one paragraph at a time. You are given a short memory of the key "
          "facts so far, the paragraph written last, an instruction for the next paragraph and related earlier "
          "paragraphs. Write the next paragraph following the instruction; then rewrite the memory (say what to "
          "drop and what to add, then give the updated memory, at most a few sentences of key information); then "
          "offer three different instructions for the paragraph after it.\n\n"
          "Input Memory:\n{short_memory}\n\nInput Paragraph:\n{paragraph}\n\nInput Instruction:\n{plan}\n\n"
          "Input Related Paragraphs:\n{memories}\n\n"
          "Answer in exactly this format:\nOutput Paragraph:\n<the next paragraph>\n\nOutput Memory:\n"
          "Rational: <what to drop and add>;\nUpdated Memory: <the updated memory>\n\nOutput Instruction:\n"
          "Instruction 1: <a continuation>\nInstruction 2: <a continuation>\nInstruction 3: <a continuation>\n"),
    memory_item="Related Paragraph {index}: {text}")


def head(text: str, chars: int | None) -> str:
    """The first ``chars`` characters of ``text`` (all of it when ``chars`` is ``None``)."""
    return text if chars is None else text[:chars]


def tail(text: str, chars: int | None) -> str:
    """The last ``chars`` characters of ``text`` (all of it when ``chars`` is ``None``)."""
    return text if chars is None or len(text) <= chars else text[len(text) - chars:]


def build_prompt(template: PromptTemplate, memories: Sequence[str], short_memory: str, paragraph: str, plan: str
                 ) -> str:
    """``template`` filled with the retrieved ``memories`` (most similar first), the
    short-term memory, the previous paragraph and the plan."""
    items = [template.memory_item.format(index=i + 1, text=m) for i, m in enumerate(memories)]
    return template.body.format(memories=template.memory_separator.join(items), short_memory=short_memory,
                                paragraph=paragraph, plan=plan)


# ----------------------------------------------------------------------------- output parsing


@dataclasses.dataclass(frozen=True)
class ParsedOutput:
    """One generator output read as (paragraph, short-term memory, plan); ``parsed``: the
    fields that came from the paper's format (the others are the fallback's)."""

    paragraph: str
    short_memory: str
    plan: str
    parsed: tuple[str, ...]


def section(text: str, start: str, stops: Sequence[str]) -> str | None:
    """The stripped text after the first ``start`` header (case-insensitive) up to the
    earliest of the ``stops`` headers after it (or the end); ``None`` if the header is
    missing or the section empty."""
    found = re.search(re.escape(start), text, re.IGNORECASE)
    if found is None:
        return None
    rest = text[found.end():]
    ends = [m.start() for m in (re.search(re.escape(stop), rest, re.IGNORECASE) for stop in stops) if m]
    body = rest[:min(ends, default=len(rest))].strip()
    return body or None


def lead_line_memory(short_memory: str, paragraph: str, max_chars: int) -> str:
    """The extractive short-term memory: the lines of ``short_memory`` plus the first
    non-empty line of ``paragraph``, keeping the newest lines that fit in ``max_chars``
    characters joined by newlines (the newest line alone is cut to ``max_chars``)."""
    check_positive_int("max_chars", max_chars)
    lead = next((line.strip() for line in paragraph.splitlines() if line.strip()), "")
    lines = [line for line in short_memory.splitlines() if line.strip()] + ([lead] if lead else [])
    kept: list[str] = []
    for line in reversed(lines):
        if not kept:
            kept.append(line[:max_chars])
        elif sum(map(len, kept)) + len(kept) + len(line) <= max_chars:
            kept.append(line)
        else:
            break
    return "\n".join(reversed(kept))


def parse_output(output: str, short_memory: str, plan: str, short_memory_chars: int) -> ParsedOutput:
    """Read ``output`` in the paper's format (module docstring), each field falling back on
    its own: paragraph -> the whole output, short-term memory -> :func:`lead_line_memory`
    of ``short_memory`` and the paragraph, plan -> ``plan``."""
    paragraph = section(output, "Output Paragraph:", ("Output Memory:", "Updated Memory:", "Output Instruction:"))
    memory = section(output, "Updated Memory:", ("Output Instruction:",))
    next_plan = (section(output, "Instruction 1:", ("Instruction 2:", "Instruction 3:"))
                 or section(output, "Output Instruction:", ("Instruction 2:", "Instruction 3:")))
    parsed = tuple(name for name, value in (("paragraph", paragraph), ("short_memory", memory),
                                            ("plan", next_plan)) if value is not None)
    paragraph = paragraph if paragraph is not None else output.strip()
    if memory is None:
        memory = lead_line_memory(short_memory, paragraph, short_memory_chars)
    return ParsedOutput(paragraph, memory, next_plan if next_plan is not None else plan, parsed)


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The loop's settings. ``top_k``: memories retrieved per step (the official code: 2);
    ``retrieval``: ``"cosine"`` (the paper's semantic search) or ``"recent"`` (an ablation:
    the ``top_k`` newest memories, newest first, their cosines still reported);
    ``dim``, ``ngram``: the embedding's; ``short_memory_chars``: the short-term memory's
    budget (the fallback keeps that many characters; the prompt shows its tail of that
    length); ``memory_chars`` / ``paragraph_chars``: what of each retrieved memory (its
    head) and of the previous paragraph (its tail) goes into the prompt (``None``: all)."""

    template: PromptTemplate = PAPER_TEMPLATE
    top_k: int = 2
    retrieval: str = "cosine"
    dim: int = 1024
    ngram: int = 3
    short_memory_chars: int = 400
    memory_chars: int | None = None
    paragraph_chars: int | None = None

    def __post_init__(self):
        if self.top_k < 0:
            raise ValueError(f"top_k: expected >= 0, got {self.top_k}")
        check_choice("retrieval", self.retrieval, RETRIEVALS)
        check_positive_int("dim", self.dim)
        check_positive_int("ngram", self.ngram)
        check_positive_int("short_memory_chars", self.short_memory_chars)
        for name in ("memory_chars", "paragraph_chars"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name}: expected None or >= 0, got {value}")


@dataclasses.dataclass(frozen=True)
class MemoryItem:
    """One long-term memory: the paragraph written at ``step`` and its embedding ``[dim]``."""

    text: str
    embedding: np.ndarray
    step: int


@dataclasses.dataclass(frozen=True)
class LoopState:
    """``(x_t, h_t, p_t, M_t)`` of the module docstring; ``paragraph`` was written at ``step``."""

    paragraph: str
    short_memory: str
    plan: str
    long_memory: tuple[MemoryItem, ...] = ()
    step: int = 0


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """What step ``step`` did: the ``prompt``, the raw ``output``, the ``retrieved``
    long-term memories (indices into ``M_t``, most similar first) with their cosine
    ``scores``, ``memory_size = |M_t|`` before the append, and the new paragraph,
    short-term memory and plan with the fields that ``parsed`` from the format."""

    step: int
    prompt: str
    output: str
    retrieved: tuple[int, ...]
    scores: tuple[float, ...]
    memory_size: int
    paragraph: str
    short_memory: str
    plan: str
    parsed: tuple[str, ...]


def initial_state(opening: str, plan: str = "", short_memory: str | None = None,
                  config: LoopConfig = LoopConfig()) -> LoopState:
    """The state before step 1: ``x_0 = opening``, ``p_0 = plan``, empty long-term memory and
    ``h_0 = short_memory`` (default: :func:`lead_line_memory` of the opening)."""
    if short_memory is None:
        short_memory = lead_line_memory("", opening, config.short_memory_chars)
    return LoopState(opening, short_memory, plan)


def query_text(state: LoopState) -> str:
    """The retrieval query of ``state``: ``h_t`` and ``p_t`` on separate lines."""
    return state.short_memory + "\n" + state.plan


def recurrent_step(state: LoopState, generate: Generate, config: LoopConfig = LoopConfig()
                   ) -> tuple[LoopState, StepRecord]:
    """One RecurrentGPT step (module docstring): retrieve, prompt, generate, parse, archive."""
    hits: list[tuple[int, float]] = []
    if state.long_memory:
        keys = np.stack([m.embedding for m in state.long_memory])
        query = embed(query_text(state), config.dim, config.ngram)
        if config.retrieval == "cosine":
            hits = retrieve(query, keys, config.top_k)
        else:
            newest = range(len(keys) - 1, max(-1, len(keys) - 1 - config.top_k), -1)
            hits = [(i, float(keys[i] @ query)) for i in newest]
    memories = [head(state.long_memory[i].text, config.memory_chars) for i, _ in hits]
    prompt = build_prompt(config.template, memories, tail(state.short_memory, config.short_memory_chars),
                          tail(state.paragraph, config.paragraph_chars), state.plan)
    output = generate(prompt)
    if not isinstance(output, str):
        raise ValueError(f"generate: expected a callable returning str, got {type(output).__name__}")
    parsed = parse_output(output, state.short_memory, state.plan, config.short_memory_chars)
    archived = MemoryItem(state.paragraph, embed(state.paragraph, config.dim, config.ngram), state.step)
    new_state = LoopState(parsed.paragraph, parsed.short_memory, parsed.plan, state.long_memory + (archived,),
                          state.step + 1)
    record = StepRecord(new_state.step, prompt, output, tuple(i for i, _ in hits), tuple(s for _, s in hits),
                        len(state.long_memory), parsed.paragraph, parsed.short_memory, parsed.plan, parsed.parsed)
    return new_state, record


def run_loop(state: LoopState, generate: Generate, steps: int, config: LoopConfig = LoopConfig()
             ) -> tuple[LoopState, list[StepRecord]]:
    """``steps`` calls of :func:`recurrent_step` from ``state``: the final state (its
    ``long_memory`` holds every paragraph but the last, which is ``paragraph``) and one
    record per step."""
    if steps < 0:
        raise ValueError(f"steps: expected >= 0, got {steps}")
    records = []
    for _ in range(steps):
        state, record = recurrent_step(state, generate, config)
        records.append(record)
    return state, records
