"""An optional LLM judge of steered generations: concept presence and fluency, 0-2 each (the AxBench
style of rating), asked only when OPENAI_API_KEY is set. The concept is the feature's explanation from
`interpret` when there is one, else its most promoted tokens. Same client, answer cache, retries and
cost cap as `interpret` (:mod:`pipeline.infra.chat`): a re-run pays nothing twice, and re-asks what it could
not read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.infra.chat import AnswerCache, Budget, ChatClient, ClientSettings, Messages, api_key_present
from pipeline.infra.console import say
from pipeline.infra.files import Folder

SYSTEM = (
    "You rate continuations written by a language model. Given a concept, a prompt and the model's "
    "continuation, rate two things from 0 to 2. concept: 0 = the concept is absent, 1 = it is hinted at, "
    "2 = it is clearly present. fluency: 0 = broken or repetitive text, 1 = somewhat fluent, 2 = fluent "
    'English. Answer with JSON only: {"concept": c, "fluency": f}.'
)


def judge_messages(concept: str, prompt: str, text: str) -> Messages:
    user = f"Concept: {concept}\nPrompt: {prompt}\nContinuation: {text}"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def parse_rating(text: str) -> tuple[int, int] | None:
    """(concept, fluency) from the judge's answer, or None when it is not two ratings in 0..2."""
    found = re.search(r"\{.*\}", text, re.DOTALL)
    try:
        data = json.loads(found.group(0)) if found else None
        ratings = (int(data["concept"]), int(data["fluency"])) if isinstance(data, dict) else None
    except (ValueError, KeyError, TypeError):
        return None
    return ratings if ratings and all(0 <= r <= 2 for r in ratings) else None


@dataclass
class JudgePlan:
    """The judge's requests and their estimated cost, worked out before anything is sent."""

    status: str  # what summary.json says about the judge
    refusal: str = ""  # why nothing is sent (the estimate is above --max-cost), else ""
    client: ChatClient | None = None  # set when the judge will be asked
    requests: list[Messages] = field(default_factory=list)

    def ask(self) -> list[tuple[int, int] | None]:
        """A rating per request (None where the answer was unusable or not sent)."""
        assert self.client is not None, "ask() needs a plan that sends requests"
        replies = self.client.ask_all(self.requests, accept=usable)
        return [parse_rating(reply.get("text", "")) if reply.get("text") else None for reply in replies]


def usable(_: int, text: str) -> bool:
    """Whether a judge's answer is two ratings; one that is not is never cached, so a re-run asks again."""
    return parse_rating(text) is not None


def plan_judge(
    generations: list[dict[str, Any]],
    concepts: dict[int, str],
    settings: ClientSettings,
    max_cost: float,
    answers: Folder,
) -> JudgePlan:
    """Estimate the judge's cost of rating every generation and check it against ``max_cost``; sends nothing."""
    if not api_key_present():
        say("steer: OPENAI_API_KEY is not set; the LLM judge is skipped (concept and fluency stay empty).")
        return JudgePlan("skipped (no OPENAI_API_KEY)")
    client = ChatClient(settings, AnswerCache(answers), Budget(max_cost))
    requests = [judge_messages(concepts[g["feature"]], g["prompt"], g["text"]) for g in generations]
    estimate = client.estimate(requests, accept=usable)
    say(estimate.line("cost estimate, judge"))
    if max_cost > 0 and (estimate.usd or 0.0) > max_cost:
        refusal = (
            f"the judge's estimated cost ${estimate.usd:.4f} is above --max-cost ${max_cost:g}; nothing was sent. "
            "Raise --max-cost, judge fewer settings, or use a cheaper --judge-model."
        )
        return JudgePlan(f"refused: estimated ${estimate.usd:.4f} is above --max-cost ${max_cost:g}", refusal)
    return JudgePlan(f"{settings.model} (ratings pending)", client=client, requests=requests)
