import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "loraweb.settings")
application = get_asgi_application()

from django.conf import settings  # noqa: E402 - settings are readable only after the setup above

# An inference server exists to generate, so it loads the base model as soon as it starts, in
# the background, and /readyz reports it unavailable until the model is loaded. Other roles
# load the model on their first completion request.
if settings.LORAWEB_ROLE == "inference":
    from adapters_app.inference import load_engine_in_background

    load_engine_in_background()
