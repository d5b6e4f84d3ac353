"""Cursor pagination as the `openai` client pages: `after` is the id of the last item of the
previous page, `has_more` says whether to ask again (openai/pagination.py, SyncCursorPage)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from kubetune_api.errors import bad_request
from kubetune_api.schemas import ListPage

T = TypeVar("T")


def limit_of(query: Mapping[str, str], default: int, maximum: int) -> int:
    raw = query.get("limit")
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(f"limit must be an integer (got {raw!r})", param="limit") from None
    if not 1 <= value <= maximum:
        raise bad_request(f"limit must be between 1 and {maximum} (got {value})", param="limit")
    return value


def paginate(
    items: Sequence[T], *, after: str | None, limit: int, key: Callable[[T], str]
) -> ListPage[T]:
    """The `limit` items following the one whose id is `after` (from the start without it)."""
    start = 0
    if after:
        ids = [key(item) for item in items]
        if after not in ids:
            raise bad_request(
                f"after: {after!r} is not in this list (deleted, or from another list)",
                param="after",
            )
        start = ids.index(after) + 1
    page = list(items[start : start + limit])
    return ListPage[T](
        data=page,
        has_more=start + limit < len(items),
        first_id=key(page[0]) if page else None,
        last_id=key(page[-1]) if page else None,
    )
