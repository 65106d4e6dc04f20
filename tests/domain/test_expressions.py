"""The analysis condition language: what it evaluates, what it refuses, and that no input ever
gets executed (the evaluator walks a whitelist of syntax; it never calls eval/compile/exec)."""

from __future__ import annotations

import builtins
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shipyard.domain.expressions import (
    MAX_LENGTH,
    EvaluationError,
    ExpressionError,
    Value,
    compile_condition,
)


@pytest.mark.parametrize(
    ("source", "result", "expected"),
    [
        pytest.param("result < 0.05", 0.01, True, id="below"),
        pytest.param("result < 0.05", 0.05, False, id="not-below"),
        pytest.param("result >= 0.2", 0.2, True, id="at-least"),
        pytest.param("0 <= result < 1", 0.5, True, id="chained"),
        pytest.param("0 <= result < 1", 1.5, False, id="chained-false"),
        pytest.param("result[0] < 0.05 and result[1] < 0.05", [0.01, 0.02], True, id="index"),
        pytest.param("result[-1] > 10", [1, 11], True, id="negative-index"),
        pytest.param("len(result) == 3", [1, 2, 3], True, id="len"),
        pytest.param("max(result) < 0.1", [0.01, 0.09], True, id="max"),
        pytest.param("min(result) > 0.1", [0.01, 0.09], False, id="min"),
        pytest.param("not isNaN(result) and result * 100 < 5", 0.04, True, id="arithmetic"),
        pytest.param("abs(result - 1) < 0.01 or false", 1.005, True, id="abs-or"),
        pytest.param("-result > 0", -1, True, id="unary-minus"),
        pytest.param("result / 2 == 2", 4, True, id="division"),
        pytest.param('result == "ok"', "ok", True, id="string"),
        pytest.param("result == true", True, True, id="boolean"),
        pytest.param("result", False, False, id="bare-boolean"),
        pytest.param('result != "ok"', 3, True, id="mixed-equality"),
    ],
)
def test_conditions_evaluate(source: str, result: Value, expected: bool) -> None:
    assert compile_condition(source).evaluate(result) is expected


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        pytest.param("result.__class__", "attribute", id="attribute"),
        pytest.param("().__class__.__bases__[0]", "attribute", id="dunder-escape"),
        pytest.param("__import__('os').system('true')", "may be called", id="import"),
        pytest.param("open('/etc/passwd')", "may be called", id="call-builtin"),
        pytest.param("lambda: 1", "Lambda", id="lambda"),
        pytest.param("[x for x in result]", "ListComp", id="comprehension"),
        pytest.param("result ** 99999999", "Pow", id="power"),
        pytest.param("result[0:2]", "slices", id="slice"),
        pytest.param("len(result, 1)", "exactly one argument", id="arity"),
        pytest.param("max(*result)", "exactly one argument", id="starred"),
        pytest.param("len(x=result)", "may be called", id="keyword"),
        pytest.param("rate < 1", "unknown name 'rate'", id="unknown-name"),
        pytest.param("result < 0.05 &&", "not a valid condition", id="syntax"),
        pytest.param("result in [1]", "In", id="in"),
        pytest.param("(x := 1)", "NamedExpr", id="walrus"),
        pytest.param("result if result else 0", "IfExp", id="ternary"),
        pytest.param("None", "literal None", id="none"),
        pytest.param("", "empty", id="empty"),
        pytest.param("1 <" * 600 + "1", "at most", id="huge"),
    ],
)
def test_anything_else_is_refused_at_compile_time(source: str, needle: str) -> None:
    with pytest.raises(ExpressionError, match=needle):
        compile_condition(source)


@pytest.mark.parametrize(
    ("source", "result", "needle"),
    [
        pytest.param("result < 0.05", [0.01], "cannot compare", id="list-vs-number"),
        pytest.param("result[3] < 1", [0.01], "out of range", id="index-range"),
        pytest.param("result[0] < 1", 0.5, "not a list", id="index-a-number"),
        pytest.param("result * 2 > 1", "abc", "needs a number", id="string-arithmetic"),
        pytest.param("result / 0 > 1", 1, "division by zero", id="division-by-zero"),
        pytest.param("result + 1", 1, "not true or false", id="not-boolean"),
        pytest.param("result and true", 1, "needs true or false", id="number-as-boolean"),
        pytest.param("max(result) > 1", [], "non-empty list", id="max-of-nothing"),
        pytest.param("result[0.5] > 1", [1, 2], "not an integer", id="fractional-index"),
    ],
)
def test_a_result_the_condition_cannot_judge_is_an_evaluation_error(
    source: str, result: Value, needle: str
) -> None:
    with pytest.raises(EvaluationError, match=needle):
        compile_condition(source).evaluate(result)


def test_strings_cannot_be_multiplied_into_a_memory_bomb() -> None:
    with pytest.raises(EvaluationError, match="needs a number"):
        compile_condition('len("a" * 100000000000) > 1').evaluate(1)


def test_numbers_are_floats_so_arithmetic_cannot_grow_without_bound() -> None:
    big = "*".join(["99999999999999999999"] * 20)
    assert compile_condition(f"{big} * {big} > result").evaluate(1.0) is True
    # As floats the product overflows to inf, and inf * 0 is NaN (as Python ints it would be 0).
    assert compile_condition(f"isNaN({big} * {big} * 0)").evaluate(1.0) is True


def test_condition_length_is_bounded() -> None:
    with pytest.raises(ExpressionError, match=f"at most {MAX_LENGTH}"):
        compile_condition("result < 1 " + " " * MAX_LENGTH + "and true" * 2)


#: Builtins that would execute or reach outside; none may be called while a condition is
#: parsed (ast.parse calls ``compile`` to build the tree and ast.walk imports deque: not those)
#: or evaluated.
_PARSE_TRIPWIRES = ("eval", "exec", "open", "breakpoint")
_EVAL_TRIPWIRES = (*_PARSE_TRIPWIRES, "compile", "__import__")


def _tripwires(names: tuple[str, ...]) -> Any:
    def tripwire(name: str) -> Any:
        def called(*args: object, **kwargs: object) -> None:
            raise AssertionError(f"{name} was called")

        return called

    return mock.patch.multiple(builtins, **{n: tripwire(n) for n in names})


@settings(max_examples=400, deadline=None)
@given(
    source=st.text(
        alphabet=st.sampled_from(
            list("result0123456789.<>=!()[]+-*/ _aboixlnpetNaS\"'`,:;@~^&|{}")
        ),
        max_size=60,
    ),
    result=st.one_of(
        st.floats(allow_nan=True),
        st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=3),
        st.text(max_size=5),
        st.booleans(),
    ),
)
def test_no_input_is_ever_executed(source: str, result: Any) -> None:
    """Random conditions either compile or are refused; evaluating compiled ones answers a
    boolean or an EvaluationError, and never reaches eval/exec/compile/__import__/open."""
    with _tripwires(_PARSE_TRIPWIRES):
        try:
            condition = compile_condition(source)
        except ExpressionError:
            return
    with _tripwires(_EVAL_TRIPWIRES):
        try:
            answer = condition.evaluate(result)
        except EvaluationError:
            return
    assert isinstance(answer, bool)


def test_the_tripwires_do_trip() -> None:
    with _tripwires(_EVAL_TRIPWIRES), pytest.raises(AssertionError, match="eval was called"):
        eval("1")  # noqa: S307 - proving the tripwire works


@settings(max_examples=200, deadline=None)
@given(attr=st.from_regex(r"\A[a-z_]{1,12}\Z"), call=st.from_regex(r"\A[a-z_]{1,12}\Z"))
def test_attributes_and_unknown_calls_are_always_refused(attr: str, call: str) -> None:
    with pytest.raises(ExpressionError):
        compile_condition(f"result.{attr} < 1")
    if call not in ("len", "abs", "min", "max", "result", "true", "false"):
        with pytest.raises(ExpressionError):
            compile_condition(f"{call}(result) < 1")
