"""The query meter: every call counted, and any call that would pass the budget refused before it is sent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BudgetUnit = Literal["queries", "vendor_calls"]


class BudgetExhausted(RuntimeError):
    """Raised before a call that would take the meter past its budget; nothing was sent."""

    def __init__(self, unit: str, budget: int, used: int, requested: int) -> None:
        self.unit, self.budget, self.used, self.requested = unit, budget, used, requested
        super().__init__(
            f"query budget exhausted: {used} of {budget} {unit} used, this call needs {requested} more"
        )


@dataclass
class QueryMeter:
    """Counts queries, vendor calls and images sent, and refuses any call that would pass the budget.

    One *query* is one candidate prompt scored on the whole image set. One *vendor call* is one request
    to the vendor. ``budget`` caps ``unit``; ``None`` means no cap. ``queries`` and ``vendor_calls`` count what
    the fit used, whether the vendor or the query cache answered; ``paid_calls`` counts what the vendor did.
    """

    budget: int | None = None
    unit: BudgetUnit = "queries"
    queries: int = 0
    vendor_calls: int = 0
    images_sent: int = 0
    vendor_seconds: float = 0.0  # wall time spent inside vendor calls
    # What actually crossed the wire (never in the adapter: a replayed or retried fit finds the same adapter).
    paid_calls: int = 0  # calls the vendor answered in this process
    cached_calls: int = 0  # calls of the budget served wholly from the query cache
    failed_calls: int = 0  # attempts that failed (retried, or given up on)

    def __post_init__(self) -> None:
        if self.unit not in ("queries", "vendor_calls"):
            raise ValueError(f"budget unit must be 'queries' or 'vendor_calls', got {self.unit!r}")
        if self.budget is not None and self.budget < 0:
            raise ValueError(f"budget must be non-negative, got {self.budget}")

    @property
    def used(self) -> int:
        """Spent, in the budget's unit."""
        return self.queries if self.unit == "queries" else self.vendor_calls

    @property
    def remaining(self) -> int | None:
        """Left, in the budget's unit (``None`` when uncapped)."""
        return None if self.budget is None else self.budget - self.used

    def check(self, queries: int = 0, vendor_calls: int = 0) -> None:
        """Raise :class:`BudgetExhausted` if a call of this cost would not fit; change nothing."""
        need = queries if self.unit == "queries" else vendor_calls
        if self.budget is not None and self.used + need > self.budget:
            raise BudgetExhausted(self.unit, self.budget, self.used, need)

    def charge(self, queries: int = 0, vendor_calls: int = 0, images: int = 0) -> None:
        """Check, then record, the cost of a call about to be made."""
        self.check(queries, vendor_calls)
        self.queries += queries
        self.vendor_calls += vendor_calls
        self.images_sent += images

    def summary(self) -> dict[str, int | str | None]:
        """The counts as a plain dict."""
        return {"budget": self.budget, "unit": self.unit, "queries": self.queries,
                "vendor_calls": self.vendor_calls, "images_sent": self.images_sent, "paid_calls": self.paid_calls,
                "cached_calls": self.cached_calls, "failed_calls": self.failed_calls}

