"""Option values shared by the command lines (``onnxprune`` and ``onnxprune ensemble``): one
spelling and one error message for each kind of value, checked by click before a command runs."""
from __future__ import annotations

import re

import click


class Fraction(click.ParamType):
    """A fraction written 0.5 or 50%."""

    name = "fraction"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        text = str(value).strip()
        try:
            number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            self.fail(f"{value!r} is not a fraction (0.5) or a percentage (50%)", param, ctx)
        if not 0 <= number <= 1:
            self.fail(f"{value!r} is not between 0 and 1 (0% and 100%)", param, ctx)
        return number


def parse_size(text: str) -> int:
    """'4G', '512M', '1.5GB', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)i?[bB]?\s*", str(text))
    if not match:
        raise click.BadParameter(f"{text!r} is not a size like 4G, 512M or 1000000")
    value = float(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " ")
    if value < 1:
        raise click.BadParameter("the memory budget must be at least one byte")
    return int(value)
