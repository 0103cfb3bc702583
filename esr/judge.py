"""Judges: split a response into attempts and score each 0-100 for how well it answers the prompt.

Every ESR number comes from a judge, so a grade records who graded (judge id), under which
protocol (version + prompt hash), and why grading failed instead of silently dropping the trial.

    judge = make_judge("offline")                      # CPU, no network (default)
    judge = make_judge("anthropic:claude-haiku-4-5-20251001")
    judge = make_judge("openai:qwen3-32b@http://localhost:8000/v1")   # vLLM / Ollama / hosted
    grades = judge.grade_many([GradeRequest(prompt, response, label), ...])
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

from esr.errors import EsrError


@dataclass(frozen=True)
class Attempt:
    """One attempt at answering: its text, [start, end) span in the response, score 0-100.

    `span` is None when an API judge returned text that cannot be located in the response.
    """

    text: str
    span: tuple[int, int] | None
    score: float | None

    def to_dict(self) -> dict:
        return {"text": self.text, "span": list(self.span) if self.span else None,
                "score": self.score}

    @classmethod
    def from_dict(cls, d: dict) -> "Attempt":
        span = d.get("span")
        return cls(d.get("text", ""), tuple(span) if span else None, d.get("score"))


@dataclass
class Grade:
    """A judge's verdict on one response. `error` set means grading failed: exclude, don't guess."""

    attempts: list[Attempt]
    judge: str
    protocol: str
    error: str | None = None
    degenerate: str | None = None  # reason from esr.segment.degenerate_reason, None if fine
    raw: str | None = None  # the API judge's full reply, for audit

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def scores(self) -> list[float | None]:
        return [a.score for a in self.attempts]

    @property
    def n_attempts(self) -> int | None:
        return None if self.error else len(self.attempts)

    @property
    def esr(self) -> bool | None:
        """The paper's ESR event: >= 2 scored attempts and the last scores strictly above the first."""
        if self.error:
            return None
        s = [x for x in self.scores if x is not None]
        return len(s) >= 2 and s[-1] > s[0]

    def to_row(self) -> dict:
        """Fields `esr judge` adds to an input row."""
        return {
            "attempts": [a.to_dict() for a in self.attempts],
            "n_attempts": self.n_attempts,
            "esr": self.esr,
            "degenerate": self.degenerate is not None,
            "degenerate_reason": self.degenerate,
            "judge": {"id": self.judge, "protocol": self.protocol},
            "judge_error": self.error,
        }

    def to_dict(self) -> dict:
        return {"attempts": [a.to_dict() for a in self.attempts], "judge": self.judge,
                "protocol": self.protocol, "error": self.error, "degenerate": self.degenerate,
                "raw": self.raw}

    @classmethod
    def from_dict(cls, d: dict) -> "Grade":
        return cls([Attempt.from_dict(a) for a in d.get("attempts") or []], d["judge"],
                   d["protocol"], d.get("error"), d.get("degenerate"), d.get("raw"))

    @classmethod
    def from_row(cls, row: dict) -> "Grade":
        """Rebuild a grade from a row written by `esr judge`."""
        j = row.get("judge") or {}
        if isinstance(j, str):
            j = {"id": j, "protocol": ""}
        return cls([Attempt.from_dict(a) for a in row.get("attempts") or []], j.get("id", ""),
                   j.get("protocol", ""), row.get("judge_error"), row.get("degenerate_reason")
                   or ("repetition" if row.get("degenerate") else None))


@dataclass(frozen=True)
class GradeRequest:
    prompt: str
    response: str
    steering_label: str | None = None


class Judge(Protocol):
    """Anything that grades: the offline judge, the API judges, a test double."""

    id: str
    protocol: str

    def grade(self, prompt: str, response: str, steering_label: str | None = None) -> Grade: ...

    def grade_many(self, requests: Sequence[GradeRequest],
                   progress: Callable[[int], None] | None = None) -> list[Grade]: ...


# ----------------------------------------------------------------------------------------------
# Registry

_SPEC_RE = re.compile(r"^(?P<kind>anthropic|openai):(?P<model>[^@\s]+?)(?:@(?P<url>https?://\S+))?$")


@dataclass(frozen=True)
class JudgeSpec:
    kind: str  # "offline" | "anthropic" | "openai"
    model: str | None = None
    base_url: str | None = None


def parse_judge_spec(spec: str) -> JudgeSpec:
    """Parse `offline`, `anthropic:<model>[@<base_url>]` or `openai:<model>[@<base_url>]`.

    Models are named exactly (no aliases): the paper's code resolved "haiku" to a different model
    than the one its numbers came from.
    """
    spec = spec.strip()
    if spec in ("offline", "offline:minilm"):
        return JudgeSpec("offline")
    m = _SPEC_RE.match(spec)
    if not m:
        raise EsrError(f"unknown judge {spec!r}: use offline, anthropic:<model> or "
                       "openai:<model>[@<base_url>] (e.g. openai:qwen3-32b@http://localhost:8000/v1)")
    return JudgeSpec(m["kind"], m["model"], m["url"])


def make_judge(spec: str, *, cache_dir: str | Path | None = None, **options) -> Judge:
    """Build a judge from its spec string. `options` go to the judge's config (see judge_api)."""
    s = parse_judge_spec(spec)
    if s.kind == "offline":
        from esr.judge_offline import OfflineJudge

        return OfflineJudge(**options)
    from esr.judge_api import ApiJudge, ApiJudgeConfig

    config = ApiJudgeConfig(**options)
    return ApiJudge(s.kind, s.model or "", s.base_url, config=config,
                    cache=GradeCache(cache_dir) if cache_dir else None)


# ----------------------------------------------------------------------------------------------
# Cache


class GradeCache:
    """Successful grades on disk, one JSON file per (judge id, protocol, prompt, response, label).

    Failures are never written (a transient 429 must not become a permanent verdict) and API keys
    are never part of a key or a file. Writes are atomic, so concurrent workers are safe.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(judge_id: str, protocol: str, prompt: str, response: str, label: str | None) -> str:
        blob = json.dumps([judge_id, protocol, prompt, response, label], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Grade | None:
        try:
            return Grade.from_dict(json.loads(self._path(key).read_text()))
        except (OSError, ValueError, KeyError):
            return None

    def put(self, key: str, grade: Grade) -> None:
        if grade.error is not None:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(grade.to_dict(), f, ensure_ascii=False)
        os.replace(tmp, path)


def default_cache_dir() -> Path:
    """ESR_CACHE/judge, else the user cache dir (same root as the model cache in esr.models)."""
    root = os.environ.get("ESR_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "esr"
    return Path(root).expanduser() / "judge"


# ----------------------------------------------------------------------------------------------
# Cross-judge agreement (the paper's experiment 7)


@dataclass
class Agreement:
    """How far two judges agree on the same responses (both graded without error)."""

    n: int
    multi_attempt: float | None  # share of responses where both agree on ">= 2 attempts"
    esr: float | None  # share where both agree on the ESR event
    esr_direction: float | None  # among responses both call multi-attempt: agree last > first
    n_both_multi: int
    kappa_multi: float | None  # Cohen's kappa on multi-attempt
    pearson_first: float | None  # first-attempt scores
    spearman_first: float | None
    n_excluded: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "extra"} | self.extra


def _ranks(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(x: list[float], y: list[float]) -> float | None:
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def agreement(a: Iterable[Grade], b: Iterable[Grade]) -> Agreement:
    """Agreement of two judges on aligned grades (same order = same response)."""
    pairs = list(zip(a, b))
    both = [(x, y) for x, y in pairs if x.ok and y.ok]
    n = len(both)
    if n == 0:
        return Agreement(0, None, None, None, 0, None, None, None, len(pairs))

    def multi(g: Grade) -> bool:
        return len([s for s in g.scores if s is not None]) >= 2

    ma = [multi(x) for x, _ in both]
    mb = [multi(y) for _, y in both]
    agree_multi = sum(p == q for p, q in zip(ma, mb)) / n
    agree_esr = sum(bool(x.esr) == bool(y.esr) for x, y in both) / n
    bm = [(x, y) for (x, y), p, q in zip(both, ma, mb) if p and q]
    direction = (sum(bool(x.esr) == bool(y.esr) for x, y in bm) / len(bm)) if bm else None
    pa, pb = sum(ma) / n, sum(mb) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    kappa = None if pe == 1 else (agree_multi - pe) / (1 - pe)
    firsts = [(x.scores[0], y.scores[0]) for x, y in both
              if x.scores and y.scores and x.scores[0] is not None and y.scores[0] is not None]
    fx, fy = [p for p, _ in firsts], [q for _, q in firsts]
    return Agreement(n, agree_multi, agree_esr, direction, len(bm), kappa, _pearson(fx, fy),
                     _pearson(_ranks(fx), _ranks(fy)), len(pairs) - n)
