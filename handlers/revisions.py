"""Published revisions of an app: who published which spec when, for history and rollback.

Each app published over HTTP has one `History` record in the revisions bucket
(key `owner.title`, like its spec in the apps bucket; see `handlers.state`).
It lists the revisions kept, newest last, each with the spec exactly as it
was submitted (before `framework` presets are filled in), its digest, who
published it and when. The apps bucket keeps holding the current spec, as
validated and expanded: handlers and the gateway's spec cache read it there.

Revision numbers only grow: an update, a rollback (an earlier spec made
current again) and a publish after the app was removed each take the next
number; removing an app keeps its history, so numbers are never reused.
Only the newest `keep` revisions are kept (older ones can no longer be
rolled back to). All changes are pure functions of the record, applied with
`Records.change` (compare-and-set), so concurrent publishes never lose one.
"""

import hashlib
import json
from typing import Any

from pydantic import BaseModel, Field


class Revision(BaseModel):
    """One published spec."""

    revision: int = Field(ge=1)
    digest: str = Field(description="sha256 of the submitted spec's canonical JSON, hex")
    published_by: str | None = Field(description="the publisher token's subject, if any")
    published_at: float = Field(description="Unix seconds")
    spec: dict[str, Any] = Field(description="the spec as submitted (presets not expanded)")


class History(BaseModel):
    """An app's revisions, oldest first, and the one that is current."""

    revisions: list[Revision] = Field(default_factory=list)
    current: int = Field(0, description="the current revision; 0 once the app is removed")

    @property
    def last(self) -> int:
        return self.revisions[-1].revision if self.revisions else 0

    def find(self, revision: int) -> Revision | None:
        return next((r for r in self.revisions if r.revision == revision), None)

    def current_revision(self) -> Revision | None:
        return self.find(self.current) if self.current else None


def not_kept(app: str, revision: int) -> str:
    """What a run pinned to a revision the history no longer keeps is told."""
    return f"{app} has no revision {revision} (only kept revisions can run)"


def canonical(spec: dict[str, Any]) -> bytes:
    """The spec's canonical JSON: sorted keys, no spaces, UTF-8."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(spec: dict[str, Any]) -> str:
    """`sha256:<hex>` of the spec's canonical JSON."""
    return "sha256:" + hashlib.sha256(canonical(spec)).hexdigest()


def publish(
    history: History, spec: dict[str, Any], *, by: str | None, at: float, keep: int
) -> History | None:
    """`history` with `spec` as a new current revision; None if it is already current."""
    sha = digest(spec)
    current = history.current_revision()
    if current is not None and current.digest == sha:
        return None
    new = Revision(
        revision=history.last + 1, digest=sha, published_by=by, published_at=at, spec=spec
    )
    return History(revisions=[*history.revisions, new][-keep:], current=new.revision)


def removed(history: History) -> History | None:
    """`history` with no current revision (the app was removed); None if it had none."""
    if not history.current:
        return None
    return history.model_copy(update={"current": 0})
