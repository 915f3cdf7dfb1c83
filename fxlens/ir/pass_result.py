"""What every pass returns: its name and what it matched, for logs, dumps and errors."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PassResult:
    name: str
    matched: int
    details: dict = field(default_factory=dict)
    skipped: tuple = ()

    def __str__(self) -> str:
        extra = f" {self.details}" if self.details else ""
        skip = f" skipped: {'; '.join(self.skipped)}" if self.skipped else ""
        return f"{self.name}: {self.matched} matched{extra}{skip}"
