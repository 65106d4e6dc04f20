"""The small, safe expression language of analysis conditions (``success_condition = "result <
0.05"``): compiled once when a manifest is validated, evaluated for every measurement.

A condition is Python expression *syntax* read by ``ast.parse(mode="eval")`` and walked by a
whitelist; the string is never handed to ``eval``/``compile``/``exec``. What is allowed:

- literals: numbers, strings, ``true``/``false`` (and Python's ``True``/``False``);
- the name ``result`` (what the provider measured: a number, a string, a boolean or a list of
  them), ``result[i]`` (an integer index, negative counts from the end);
- ``and`` / ``or`` / ``not``; comparisons ``< <= > >= == !=`` (chains too: ``0 <= result < 1``);
  ``+ - * /`` and unary ``-``/``+`` on numbers;
- the functions ``len(x)``, ``isNaN(x)``, ``abs(x)``, ``min(list)``, ``max(list)``.

Anything else (attributes, other names or calls, lambdas, comprehensions, keyword arguments,
``**``, subscripts other than an index) is refused with ``ExpressionError`` naming it. Types are
strict at evaluation: arithmetic and ordering need numbers (or two strings to order), ``and``/
``or``/``not`` need booleans, and the whole condition must be a boolean; anything else raises
``EvaluationError`` (an Argo-style measurement *error*, not a verdict). Numbers are floats, so
no arithmetic can grow without bound.

Lives in ``domain`` because manifest validation (``domain.models.MetricSettings``) compiles
every condition; ``analysis.metrics`` evaluates them.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Union

#: A condition longer than this is refused (a condition is one line of a manifest).
MAX_LENGTH = 1000
#: ... and so is one with more syntax nodes than this (nesting cannot exhaust the stack).
MAX_NODES = 200

Value = Union[float, int, str, bool, Sequence["Value"]]  # noqa: UP007 - a recursive alias

_NAMES: dict[str, object] = {"true": True, "false": False}
_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}
_COMPARE: dict[type[ast.cmpop], Callable[[object, object], bool]] = {
    ast.Lt: lambda a, b: a < b,  # type: ignore[operator]
    ast.LtE: lambda a, b: a <= b,  # type: ignore[operator]
    ast.Gt: lambda a, b: a > b,  # type: ignore[operator]
    ast.GtE: lambda a, b: a >= b,  # type: ignore[operator]
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
}
_FUNCTIONS = ("len", "isNaN", "abs", "min", "max")


class ExpressionError(ValueError):
    """The condition is not in the language (raised when a manifest is validated)."""


class EvaluationError(ValueError):
    """The condition cannot be evaluated for this result (a type mismatch, an index out of
    range, a division by zero): the measurement is an error."""


@dataclass(frozen=True)
class Condition:
    """A compiled condition; ``evaluate(result)`` answers True or False."""

    source: str
    _tree: ast.expr = field(repr=False, compare=False)

    def evaluate(self, result: Value) -> bool:
        value = _Evaluator(result).eval(self._tree)
        if not isinstance(value, bool):
            raise EvaluationError(
                f"condition `{self.source}` gave {_show(value)}, not true or false"
            )
        return value


def compile_condition(source: str) -> Condition:
    """Parse and check ``source``; ``ExpressionError`` says what is wrong, in the manifest's
    terms."""
    text = source.strip()
    if not text:
        raise ExpressionError("a condition cannot be empty")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"a condition is at most {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"`{text}` is not a valid condition: {exc.msg}") from None
    except (RecursionError, MemoryError, ValueError):
        raise ExpressionError(f"`{text[:80]}` is not a valid condition") from None
    nodes = list(ast.walk(tree))
    if len(nodes) > MAX_NODES:
        raise ExpressionError(f"a condition has at most {MAX_NODES} parts")
    for node in nodes:
        _check(node)
    return Condition(text, tree.body)


def _check(node: ast.AST) -> None:
    match node:
        case ast.Expression() | ast.Load() | ast.And() | ast.Or() | ast.Not():
            return
        case ast.USub() | ast.UAdd() | ast.BoolOp() | ast.Compare() | ast.UnaryOp():
            return
        case ast.BinOp(op=op) if type(op) in _BINARY:
            return
        case ast.BinOp(op=op):
            raise ExpressionError(f"operator {type(op).__name__} is not allowed: use + - * /")
        case _ if type(node) in _BINARY or type(node) in _COMPARE:
            return
        case ast.Constant(value=value):
            if isinstance(value, bool | int | float | str) and not isinstance(value, complex):
                return
            raise ExpressionError(f"the literal {value!r} is not allowed")
        case ast.Name(id=name):
            if name == "result" or name in _NAMES or name in _FUNCTIONS:
                return
            raise ExpressionError(
                f"unknown name {name!r}: a condition may use result, true, false and "
                f"{', '.join(_FUNCTIONS)}()"
            )
        case ast.Call(func=ast.Name(id=name), args=args, keywords=[]) if name in _FUNCTIONS:
            if len(args) != 1 or isinstance(args[0], ast.Starred):
                raise ExpressionError(f"{name}() takes exactly one argument")
            return
        case ast.Call():
            raise ExpressionError(f"only {', '.join(f'{f}(x)' for f in _FUNCTIONS)} may be called")
        case ast.Subscript(slice=ast.Slice()):
            raise ExpressionError("slices are not allowed: index with result[i]")
        case ast.Subscript():
            return
        case ast.Attribute(attr=attr):
            raise ExpressionError(f"attribute access (.{attr}) is not allowed")
    raise ExpressionError(f"{type(node).__name__} is not allowed in a condition")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EvaluationError(f"{what} needs a number, got {_show(value)}")
    return float(value)


class _Evaluator:
    def __init__(self, result: Value) -> None:
        self.result = result

    def eval(self, node: ast.expr) -> object:
        match node:
            case ast.Constant(value=value):
                return float(value) if type(value) is int else value
            case ast.Name(id="result"):
                return _normal(self.result)
            case ast.Name(id=name) if name in _NAMES:
                return _NAMES[name]
            case ast.BoolOp(op=op, values=values):
                want = isinstance(op, ast.Or)
                for v in values:
                    got = self._bool(v, "and/or")
                    if got is want:
                        return want
                return not want
            case ast.UnaryOp(op=ast.Not(), operand=operand):
                return not self._bool(operand, "not")
            case ast.UnaryOp(op=ast.USub(), operand=operand):
                return -_number(self.eval(operand), "unary -")
            case ast.UnaryOp(op=ast.UAdd(), operand=operand):
                return _number(self.eval(operand), "unary +")
            case ast.BinOp(left=left, op=op, right=right):
                a = _number(self.eval(left), type(op).__name__.lower())
                b = _number(self.eval(right), type(op).__name__.lower())
                if isinstance(op, ast.Div) and b == 0:
                    raise EvaluationError("division by zero")
                return _BINARY[type(op)](a, b)
            case ast.Compare(left=left, ops=ops, comparators=comparators):
                return self._compare(left, ops, comparators)
            case ast.Subscript(value=target, slice=index):
                return self._index(self.eval(target), self.eval(index))
            case ast.Call(func=ast.Name(id=name), args=[arg]):
                return _call(name, self.eval(arg))
        raise EvaluationError(f"{type(node).__name__} cannot be evaluated")  # checked already

    def _compare(self, left: ast.expr, ops: list[ast.cmpop], rights: list[ast.expr]) -> bool:
        a = self.eval(left)
        for cmp, right in zip(ops, rights, strict=True):
            b = self.eval(right)
            if not _comparable(cmp, a, b):
                raise EvaluationError(f"cannot compare {_show(a)} with {_show(b)}")
            if not _COMPARE[type(cmp)](a, b):
                return False
            a = b
        return True

    def _bool(self, node: ast.expr, what: str) -> bool:
        value = self.eval(node)
        if not isinstance(value, bool):
            raise EvaluationError(f"{what} needs true or false, got {_show(value)}")
        return value

    def _index(self, target: object, index: object) -> object:
        if not isinstance(target, list | str):
            raise EvaluationError(f"cannot index {_show(target)}: result is not a list")
        i = _number(index, "an index")
        if not i.is_integer():
            raise EvaluationError(f"index {i:g} is not an integer")
        try:
            return target[int(i)]
        except IndexError:
            raise EvaluationError(
                f"index {int(i)} is out of range: the result has {len(target)} value(s)"
            ) from None


def _normal(value: Value) -> object:
    """``result`` as the evaluator sees it: ints as floats, sequences as lists."""
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        return float(value)
    return [_normal(v) for v in value]


def _comparable(op: ast.cmpop, a: object, b: object) -> bool:
    if isinstance(op, ast.Eq | ast.NotEq):
        return True
    numbers = all(isinstance(v, float) for v in (a, b))
    return numbers or (isinstance(a, str) and isinstance(b, str))


def _call(name: str, arg: object) -> object:
    match name:
        case "len":
            if not isinstance(arg, list | str):
                raise EvaluationError(f"len() needs a list or a string, got {_show(arg)}")
            return float(len(arg))
        case "isNaN":
            return math.isnan(_number(arg, "isNaN()"))
        case "abs":
            return abs(_number(arg, "abs()"))
        case _:  # min, max
            if not isinstance(arg, list) or not arg:
                raise EvaluationError(f"{name}() needs a non-empty list, got {_show(arg)}")
            numbers = [_number(v, f"{name}()") for v in arg]
            return min(numbers) if name == "min" else max(numbers)
