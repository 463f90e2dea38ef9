"""The Celery application: settings come from Django (``CELERY_*``), tasks from ``callops``."""

import os

from celery import Celery
from celery.signals import setup_logging
from django.conf import settings

from callops import logs

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.dev")

app = Celery("callops")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@setup_logging.connect
def _log_as_django_does(**_) -> None:
    """Workers and beat log through Django's ``LOGGING`` (``callops.logs``: JSON in
    production), not Celery's own format: with a receiver here Celery configures nothing."""
    logs.configure(settings.LOGGING)
