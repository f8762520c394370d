"""Errors that reach the user as one clear message rather than a traceback."""


class UserError(Exception):
    """A problem with the user's input (a path, a file, an option)."""


class CatalogFormatError(UserError):
    """The input is not a catalog Vitrine can read."""


class IndexUnavailableError(Exception):
    """A search index's engine cannot answer now (a vector database down or timing out): not the
    user's fault, and no bug either; the service answers 503."""
