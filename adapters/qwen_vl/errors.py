"""Why a LLaVA record cannot become a sample: one class per cause, all a :class:`RecordError`.

Their own module because the dataset raises them both while estimating and while processing,
and callers catch them by type (a DataLoader worker re-raises them from their message).
"""

from __future__ import annotations

from odb.errors import OdbError


class RecordError(OdbError, ValueError):
    """A LLaVA record cannot become a sample; the message names the record index.

    Built from one message string (``index`` is an attribute) so that the type survives being
    re-raised by ``torch.utils.data.DataLoader`` workers, which rebuild exceptions from their
    message.
    """

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


class MissingImageError(RecordError):
    """An image file named by a record does not exist."""


class UnreadableImageError(RecordError):
    """An image file exists but cannot be decoded (or has a shape Qwen-VL cannot take)."""


class ImageCountError(RecordError):
    """The ``<image>`` tags of a conversation and its images do not match."""


class NoAssistantTurnError(RecordError):
    """A conversation has no assistant (``gpt``) turn, so no token would carry loss."""


class RecordTooLongError(RecordError):
    """The estimated sample exceeds the dataset's budget; raised before any image is decoded."""


def _fail(kind: type[RecordError], index: int, problem: str) -> RecordError:
    return kind(f"record {index}: {problem}", index)
