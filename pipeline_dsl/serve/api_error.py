"""The error a client is answered with: an OpenAI-style error object and its HTTP status."""
from __future__ import annotations


class APIError(Exception):
    """An error answered to the client as an OpenAI-style JSON body."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, stage: str | None = None, quoted: tuple[str, ...] = ()):
        super().__init__(message)
        self.message = message
        # the parts of the message that show the request's content: a string, array or object it
        # gave (as JSON or repr; a number, true, false or null is no content to hide, and its text
        # may stand elsewhere in the message: "from 0 to 20, not 2")
        self.quoted = tuple(q for q in quoted if q[:1] in ('"', "'", "[", "{"))
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.stage = stage            # the python stage whose Reject this is: the body's `stage`

    @property
    def rejected(self) -> bool:
        """Whether a python stage's Reject made it (its status and Retry-After are the Reject's own)."""
        return self.stage is not None

    def body(self) -> dict:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        if self.stage is not None:
            error["stage"] = self.stage
        return {"error": error}
