"""Knobs: the few settings a method (or its network) lets users type bare on the command line
(``train.py model=pfgmpp D=2048``, ``model=flow path=ko``).

A class declares its knobs once, as a ``knobs`` class attribute of ``Knob`` entries (name, type, default,
meaning); its config file reads one with ``${knob:NAME}``. Everything else reads the declaration: the config
checks (type, range, choices; a knob the chosen model does not declare is refused), the run's description and
JSON line, the sweep summary, a resume's recorded settings and the leaderboard's entries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Knob:
    """One bare command-line setting. ``section``: the config section whose class declares it, and which a
    change of it changes (``model`` for a method's knob, ``net`` for a network's)."""

    name: str
    type: type
    default: Any
    meaning: str
    choices: tuple = ()
    lo: float | None = None        # lower bound (exclusive with lo_open)
    lo_open: bool = False
    section: str = "model"

    def problem(self, value) -> str | None:
        """Why ``value`` does not fit this knob, or None."""
        if value is None:
            return None
        numeric = self.type is float and isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric and not (isinstance(value, self.type) and not (self.type is int and isinstance(value, bool))):
            names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
            return f"it must be {names.get(self.type, self.type.__name__)}"
        if self.choices and value not in self.choices:
            return f"it must be one of {', '.join(map(str, self.choices))}"
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return f"it must be {'>' if self.lo_open else '>='} {self.lo}"
        return None

    def help(self) -> str:
        options = f" ({' | '.join(map(str, self.choices))})" if self.choices else ""
        return f"{self.name}={self.default}{options}: {self.meaning}"


def knobs_of(cls) -> tuple[Knob, ...]:
    """The knobs a class declares (none for a class without a ``knobs`` attribute)."""
    return tuple(getattr(cls, "knobs", ()) or ())
