"""Errors that reach users as one clear line (what, where, what to do)."""


class SllmfsError(Exception):
    """Base class: the message is the whole story, printed without a traceback."""


class BadInput(SllmfsError):
    """The user gave something we cannot use (a path, a name, a checkpoint)."""


class NotFound(SllmfsError):
    """A model, variant or file that is not in the store."""


class Corrupt(SllmfsError):
    """Stored bytes or metadata fail their checks."""


class FormatVersionError(SllmfsError):
    """A manifest written by a newer (or unknown) sllmfs."""


class SidecarCannotCopy(SllmfsError):
    """The sidecar cannot copy into this client's GPU memory (no GPU or CUDA on its side):
    the client copies from the mapped segments itself."""


class Pulling(SllmfsError):
    """The sidecar is bringing the model from its origin: ask again shortly (the client does)."""


def user_error(exc: BaseException) -> SllmfsError | None:
    """The SllmfsError inside ``exc``, looking through exception groups (trio >= 0.25 wraps every
    error leaving a nursery in one), so a bad start still reaches the user as one line."""
    if isinstance(exc, SllmfsError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = user_error(inner)
            if found is not None:
                return found
    return None
