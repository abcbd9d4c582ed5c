"""/api/v1/me: what signed-in users manage themselves. Today their default webhook: where their
jobs report their end (a job's notify.webhook_url overrides it), and the secret that signs it."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError

from app import webhooks
from app.api.deps import CurrentUser, SessionDep, SettingsDep
from app.api.errors import errors
from app.api.release import ReleasingRoute
from app.schemas import WebhookIn, WebhookOut

router = APIRouter(prefix="/me", tags=["me"], route_class=ReleasingRoute)  # see app/api/release.py


@router.get("/webhook", response_model=WebhookOut, name="webhook", responses=errors(401))
def get_webhook(user: CurrentUser) -> WebhookOut:
    """The default webhook URL, and whether a signing secret exists (the secret itself is shown only when made)."""
    return WebhookOut(url=user.webhook_url, has_secret=bool(user.webhook_secret))


# 400: a body that cannot be read at all (not UTF-8), which FastAPI refuses before it parses it.
@router.put("/webhook", response_model=WebhookOut, name="set_webhook", responses=errors(400, 401, 422))
def set_webhook(change: WebhookIn, user: CurrentUser, session: SessionDep, settings: SettingsDep) -> WebhookOut:
    """Set (or, with `url: null`, remove) the default webhook URL. A signing secret is made the first
    time, or with `new_secret` (the old one stops signing at once), and answered only then."""
    try:
        secret = webhooks.set_user_webhook(
            session, user, change.url, settings, clear=change.url is None, rotate=change.new_secret
        )
    except webhooks.UrlRefused as refused:
        raise RequestValidationError(
            [{"loc": ("body", "url"), "msg": str(refused), "type": "value_error", "input": change.url}]
        ) from None
    return WebhookOut(url=user.webhook_url, has_secret=bool(user.webhook_secret), secret=secret)
