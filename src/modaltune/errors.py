"""Errors raised for bad user input: each message names the file (and field) and says what to do."""


class InputError(ValueError):
    """Bad or inconsistent input data; the message names the file/field and the fix."""


class SlideError(InputError):
    """A single slide cannot be processed (unreadable, no tissue, no mpp)."""

    def __init__(self, slide: str, reason: str):
        self.slide = str(slide)
        self.reason = reason
        super().__init__(f"slide {self.slide}: {reason}")


class LeakageError(RuntimeError):
    """A patient appears in more than one partition of a fold, or a fit saw held-out data."""
