"""Final answers: extract them from completions and gold records, and decide whether two are equivalent.

Grading follows METHOD.md "Grading answers": the last brace-matched `\\boxed{}`, then the GSM8K `####`
marker, then an "answer is" phrase, then the last number; equivalence is exact (after light
normalisation), then numeric, then symbolic through `math_verify` (gold first: it is asymmetric).
All functions are pure; `math_verify` is imported on first use because it pulls in sympy.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
import threading
from typing import Any

_BOXED_CMDS = ("\\boxed", "\\fbox")
# "the answer is", "final answer is", "final answer:" with optional markdown bold around the colon.
_PHRASE_RE = re.compile(r"(?:the\s+answer\s+is|final\s+answer\s*(?:\*\*)?\s*(?:is|:))\s*:?", re.IGNORECASE)
# The answer after a phrase ends at a sentence end (". " or final "."), never inside a decimal like 3.5.
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)|\n")
_GSM8K_RE = re.compile(r"####\s*([^\n]*)")
# A minus counts only when it is not a binary minus (after a word char or a closing bracket).
_NUMBER_RE = re.compile(r"(?:(?<![\w)\]}])-)?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:/\d+)?")
_PLAIN_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?", re.IGNORECASE)
_GROUPED_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRAC_RE = re.compile(r"([+-]?)\\[dt]?frac\s*(?:\{([^{}]*)\}|(\d))\s*(?:\{([^{}]*)\}|(\d))")
_SCI_RE = re.compile(r"(.+?)\s*\\(?:times|cdot)\s*10\s*\^\s*(?:\{([^{}]*)\}|(\d))")
_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox|textnormal)\s*\{([^{}]*)\}")
# Units after a number ("5\text{ cm}") go; "\text{5}" alone is unwrapped by the caller.
_TRAILING_UNIT_RE = re.compile(r"(?<=[\d.}])\s*\\(?:text|mathrm|mbox|textnormal)\s*\{[^{}]*\}\s*$")
_DEGREES_RE = re.compile(r"\^\s*(?:\\circ|\{\\circ\})\s*$")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![a-zA-Z])")
_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")


def _match_braces(text: str, start: int) -> int | None:
    """Index of the `}` closing the `{` at `start`, or None if unbalanced; `\\{` and `\\}` are skipped."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # an escaped char (\{, \}, \\) never opens or closes a group
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (nested braces allowed) or `\\boxed x` token.

    Returns None when there is no such command or the last one's braces are unbalanced.
    """
    start = max(text.rfind(cmd) for cmd in _BOXED_CMDS)
    if start < 0:
        return None
    rest_at = start + len("\\fbox" if text.startswith("\\fbox", start) else "\\boxed")
    rest = text[rest_at:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        open_at = rest_at + len(rest) - len(stripped)
        close_at = _match_braces(text, open_at)
        return None if close_at is None else text[open_at + 1 : close_at]
    # "\boxed 5": the single token after a space, ending at whitespace or a closing `$`.
    token = re.match(r"\s+([^\s$]+)", rest)
    return token.group(1) if token else None


def _clean(answer: str) -> str:
    """Strip whitespace, markdown bold, a trailing period and surrounding math delimiters from an answer."""
    prev = None
    while prev != answer:
        prev = answer
        answer = answer.strip().strip("*").strip().rstrip(".").strip()
        for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if answer.startswith(left) and answer.endswith(right) and len(answer) >= len(left) + len(right):
                answer = answer[len(left) : len(answer) - len(right)]
    return answer


def _phrase_answer(text: str) -> str | None:
    """The answer after the last "the answer is" / "final answer is|:" phrase, up to the sentence end."""
    matches = list(_PHRASE_RE.finditer(text))
    if not matches:
        return None
    tail = text[matches[-1].end() :]
    end = _SENTENCE_END_RE.search(tail)
    answer = _clean(tail[: end.start()] if end else tail)
    return answer or None


def _last_number(text: str) -> str | None:
    """The last number in `text` (integer, decimal, thousands commas, sign, simple fraction a/b)."""
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def extract_answer(text: str) -> str | None:
    """The final answer in a completion: last `\\boxed{}`, else `#### N`, else "answer is" phrase, else last number.

    Returns the stripped answer string, or None when none of these is present.
    """
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    marked = _GSM8K_RE.findall(text)
    if marked and _clean(marked[-1]):
        return _clean(marked[-1])
    return _phrase_answer(text) or _last_number(text)


def _render_number(value: float) -> str:
    """Canonical text of a numeric gold: integral floats lose their `.0` (AMC's 27.0 -> "27")."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def extract_gold(record: dict[str, Any]) -> str | None:
    """The gold answer of a raw benchmark record, in the first layout it matches.

    `final_answer` list (OlympiadBench): items joined with ", ", `$` removed; `answer` (GSM8K text after
    `####`, MATH-500/AIME strings, AMC floats rendered canonically); else the last boxed in `solution`
    (Minerva). None when no layout yields an answer.
    """
    final = record.get("final_answer")
    if isinstance(final, list) and final:
        joined = ", ".join(_UNESCAPED_DOLLAR_RE.sub("", str(item)).strip() for item in final)
        return joined.strip() or None
    answer = record.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return _render_number(answer)
    if isinstance(answer, str) and answer.strip():
        return answer.split("####")[-1].strip() or None
    solution = record.get("solution")
    if isinstance(solution, list):
        solution = "\n".join(map(str, solution))
    if isinstance(solution, str):
        boxed = last_boxed(solution)
        return boxed.strip() if boxed and boxed.strip() else None
    return None


def _strip_number_decorations(s: str) -> str:
    """Remove currency, percent, LaTeX spacing, `{,}`, degree marks and trailing `\\text{unit}` around a number."""
    s = s.strip().strip("$").strip()
    for token in ("\\$", "\\%", "%", "\\!", "\\,", "{,}", "\\ "):
        s = s.replace(token, "")
    s = s.replace("$", "")
    s = _DEGREES_RE.sub("", _TRAILING_UNIT_RE.sub("", s.strip())).strip()
    whole_text = _TEXT_WRAP_RE.fullmatch(s)
    s = whole_text.group(1).strip() if whole_text else s
    while s.startswith("{") and s.endswith("}") and _match_braces(s, 0) == len(s) - 1:
        s = s[1:-1].strip()
    return s


def _plain_number(s: str) -> float | None:
    """A decimal, integer, scientific (1e5) or thousands-grouped number; never inf/nan or `1_000`."""
    s = s.strip()
    if _GROUPED_RE.fullmatch(s):
        s = s.replace(",", "")
    return float(s) if _PLAIN_NUMBER_RE.fullmatch(s) else None


def _ratio(num: float | None, den: float | None, sign: str = "") -> float | None:
    """num/den with an optional leading minus; None when either part is missing or den is zero."""
    if num is None or den is None or den == 0:
        return None
    return -num / den if sign == "-" else num / den


def normalize_number(s: str) -> float | None:
    """The value of `s` if it is a plain number, else None.

    Accepts "1,234", "025", "-3.50", "3/4", "\\frac{1}{2}", "\\dfrac12", "4.5e33", "3\\times 10^{8}",
    and ignores `$`, `\\$`, `%`, `\\%`, `\\!`, `{,}`, degree marks and a trailing `\\text{unit}`.
    """
    if not s:
        return None
    s = _strip_number_decorations(s)
    value = _plain_number(s)
    if value is not None:
        return value
    if frac := _FRAC_RE.fullmatch(s):
        num = _plain_number(frac.group(2) if frac.group(2) is not None else frac.group(3))
        den = _plain_number(frac.group(4) if frac.group(4) is not None else frac.group(5))
        return _ratio(num, den, frac.group(1))
    if sci := _SCI_RE.fullmatch(s):
        mantissa = _plain_number(sci.group(1))
        exponent = _plain_number(sci.group(2) if sci.group(2) is not None else sci.group(3))
        return None if mantissa is None or exponent is None else mantissa * 10.0**exponent
    if s.count("/") == 1:
        num, den = s.split("/")
        return _ratio(_plain_number(num), _plain_number(den))
    return None


def _light_normalize(s: str) -> str:
    """Drop whitespace, surrounding `$`, `\\left`/`\\right` and a trailing period, for exact comparison."""
    s = _LEFT_RIGHT_RE.sub("", s.strip().strip("$"))
    return re.sub(r"\s+", "", s).rstrip(".")


def _numbers_close(a: float, b: float) -> bool:
    """Exact when both are integers (1234.1 is not 1234); else relative tolerance 1e-4, absolute 1e-9."""
    if float(a).is_integer() and float(b).is_integer():
        return a == b
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-9)


@functools.cache
def _math_verify() -> tuple[Any, Any, type[BaseException], str | None, str | None]:
    """math_verify's parse, verify, TimeoutException and the names of their timeout keywords (if any)."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    def keyword(func: Any, names: tuple[str, ...]) -> str | None:
        params = inspect.signature(func).parameters
        return next((n for n in names if n in params), None)

    parse_kw = keyword(parse, ("parsing_timeout", "timeout_seconds", "timeout"))
    verify_kw = keyword(verify, ("timeout_seconds", "parsing_timeout", "timeout"))
    return parse, verify, TimeoutException, parse_kw, verify_kw


def _symbolic_equal(prediction: str, gold: str) -> bool:
    """math_verify's verdict, gold first; any error or timeout counts as not equivalent.

    Its timeouts use SIGALRM, which only the main thread may set, so elsewhere they are switched off.
    """
    parse, verify, timeout_exc, parse_kw, verify_kw = _math_verify()
    in_main = threading.current_thread() is threading.main_thread()
    parse_opts = {} if in_main or parse_kw is None else {parse_kw: None}
    verify_opts = {} if in_main or verify_kw is None else {verify_kw: None}
    try:
        gold_parsed = parse(f"${gold.strip().strip('$')}$", **parse_opts)
        pred_parsed = parse(f"${prediction.strip().strip('$')}$", **parse_opts)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, **verify_opts))
    # Any failure inside the library means "not shown equivalent"; its TimeoutException is a BaseException.
    except (Exception, timeout_exc):  # noqa: BLE001
        return False


def is_equivalent(prediction: str | None, gold: str | None) -> bool:
    """Whether `prediction` matches `gold`: exact (lightly normalised), then numeric, then math_verify.

    False when either is None or empty. Two plain numbers are decided numerically alone, so that
    math_verify's rounding can't accept near misses the tolerance rejected.
    """
    if not prediction or not gold or not prediction.strip() or not gold.strip():
        return False
    if _light_normalize(prediction) == _light_normalize(gold):
        return True
    pred_num, gold_num = normalize_number(prediction), normalize_number(gold)
    if pred_num is not None and gold_num is not None:
        return _numbers_close(pred_num, gold_num)
    return _symbolic_equal(prediction, gold)


def grade(prediction_text: str, gold: str | None) -> tuple[str | None, bool]:
    """Extract the final answer from a completion and compare it with `gold`: (extracted, correct)."""
    extracted = extract_answer(prediction_text)
    return extracted, is_equivalent(extracted, gold)


def canonical_answer(answer: str | None) -> str | None:
    """A key under which equal answers collide, for majority votes: numbers in one rendering
    ("1,234", "1234.0" -> "1234"), other answers lightly normalised."""
    if not answer:
        return None
    value = normalize_number(answer)
    if value is not None:
        return _render_number(float(value))
    return _light_normalize(answer) or None
