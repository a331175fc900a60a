"""Upload handler that stops reading a dataset file part once it exceeds LORAWEB_MAX_UPLOAD_BYTES.

Django's own handlers write a large upload to a temporary file however large it is. This one
runs first (see FILE_UPLOAD_HANDLERS), so an oversized file is never written anywhere. The
rest of the request body is read and discarded, and the view returns 413.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler, StopUpload
from django.http import HttpRequest

logger = logging.getLogger(__name__)

# Request attribute set to the limit in bytes when a file part was cut off.
OVER_LIMIT_ATTRIBUTE = "loraweb_upload_over_limit"

# Views (namespace:url_name) whose uploads are datasets. Other uploads, such as adapter
# imports, have limits of their own and pass through untouched.
DATASET_UPLOAD_VIEWS = frozenset({"training_app:dataset_upload", "api_v1:upload_dataset"})


class UploadSizeLimitHandler(FileUploadHandler):
    limit: int | None = None

    def new_file(self, *args: object, **kwargs: object) -> None:
        super().new_file(*args, **kwargs)
        # Django resolves the URL before CsrfViewMiddleware or the view reads the body.
        match = getattr(self.request, "resolver_match", None)
        view_name = match.view_name if match is not None else None
        self.limit = settings.LORAWEB_MAX_UPLOAD_BYTES if view_name in DATASET_UPLOAD_VIEWS else None

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes | None:
        limit = self.limit
        if limit is not None and start + len(raw_data) > limit:
            setattr(self.request, OVER_LIMIT_ATTRIBUTE, limit)
            logger.info("Upload %r stopped: larger than %d bytes", self.file_name, limit)
            # connection_reset=False makes Django read the rest of the body, so the client
            # receives the 413 page instead of a reset connection.
            raise StopUpload(connection_reset=False)
        return raw_data

    def file_complete(self, file_size: int) -> None:
        # The handlers after this one build the uploaded file object.
        return None


def upload_over_limit(request: HttpRequest) -> bool:
    """Whether the upload handler cut off a file part of this request."""
    return getattr(request, OVER_LIMIT_ATTRIBUTE, None) is not None
