"""Name → entry tables for interchangeable algorithm pieces (losses, advantage estimators, aggregations).

A config names a piece by a string; the table turns it into the function (or entry) and an unknown name into one
line that lists the valid ones. Adding a piece is registering it next to its definition: nothing else branches on the
name.
"""

from collections.abc import Callable, Iterator

from flaxalign.errors import ConfigError


class Registry:
    """An ordered name → entry table. `what` names the kind of entry in error messages ("GRPO policy_loss");
    `error` is the exception raised for an unknown name (a `ConfigError` subclass, so the CLI prints one line)."""

    def __init__(self, what: str, error: type[Exception] = ConfigError):
        self.what, self.error, self._entries = what, error, {}

    def register(self, name: str, entry=None):
        """`register(name, entry)`, or `@register(name)` above the entry's definition."""
        if entry is not None:
            return self._add(name, entry)
        return lambda entry: self._add(name, entry)

    def _add(self, name: str, entry):
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is registered twice.")
        self._entries[name] = entry
        return entry

    def check(self, name: str) -> str:
        """`name`, or the one-line error naming the valid ones."""
        if name not in self._entries:
            raise self.error(f"Unknown {self.what} {name!r}; valid ones: {', '.join(self._entries)}.")
        return name

    def __getitem__(self, name: str):
        return self._entries[self.check(name)]

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self) -> Iterator[tuple[str, Callable]]:
        return iter(self._entries.items())
