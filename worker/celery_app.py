"""The workers' Celery application: the service's broker settings (`app.core.broker`) and the one
task they run."""

from __future__ import annotations

from celery import Celery

from app.core.broker import configure
from app.core.config import get_settings

celery = configure(Celery("distill", include=["worker.tasks"]), get_settings())
