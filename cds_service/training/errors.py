"""Why a bulk export stopped. Messages name the URL, status and what to do; never a token,
an assertion or resource contents."""


class ExportError(Exception):
    """A bulk export could not go on; what was finished is kept and a rerun resumes."""


class AuthFailed(ExportError):
    """No access token: the key could not be used, or the token endpoint refused us."""


class ServerError(ExportError):
    """The FHIR server refused or failed a kick-off, status poll, download or read."""


class UnsafeUrl(ExportError):
    """A URL that would receive the token is not https (nor an allowed loopback http URL) or
    is not on the FHIR server's origin; nothing is sent there."""


class OutDirInUse(ExportError):
    """The output directory holds other files, or an export of other parameters."""
