"""Webhooks: a signed JSON message to the owner's URL when a job ends (succeeded, failed, cancelled).

Durable, through an outbox: `stage_delivery` adds the delivery's row in the very transaction that
moves the job to its terminal status (app/job_status.py), so there is one row per finished job (a
unique job_id) and a crash between ending the job and sending loses nothing. The reaper thread that
runs in the API and in every worker sends due rows (`deliver_due`), each claimed first by a
conditional UPDATE that sets a lease, so two reapers never send one row at once. A round is up to
TRIES quick tries (tenacity); a round that fails is tried again later, the wait doubling from
DISTILL_WEBHOOK_RETRY_SECONDS up to an hour, until DISTILL_WEBHOOK_MAX_ATTEMPTS rounds have failed.

A sender that dies after the receiver accepted a message but before recording it leaves the row to
be sent again once its lease ends: receivers drop a repeated `X-Distill-Delivery` id.

Signature, as Stripe's: `X-Distill-Signature: t=UNIX_TIME,v1=HEX`, HEX the HMAC-SHA256 of
`f"{t}.".encode() + body` keyed with the user's secret (`whsec_...`, as text); `t` lets a receiver
refuse replays of old messages.

Where a message may go: a shared service that posts to any URL a user names could be made to reach
hosts inside its own network (SSRF). Unless DISTILL_WEBHOOK_ALLOW_PRIVATE is set, a webhook's host
must resolve to public addresses only; it is checked when sent, and the request goes to the address
that was checked (no second lookup a DNS answer could change in between), with no redirects followed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import ssl
import threading
import time
from datetime import timedelta
from urllib.parse import urlsplit

import anyio
import httpx
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from app.core.config import Settings, get_settings
from app.core.db import db_now, session_factory
from app.models import Job, User, WebhookDelivery, new_id

log = logging.getLogger(__name__)

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
TRIES = 3  # quick tries per round, for a receiver that blips; outages are what the rounds are for
MAX_DELAY = 3600.0  # seconds between rounds, at most
ROUND_SECONDS = 30.0  # a reaper starts no new delivery after this long, so that its other work goes on
SIGNATURE_HEADER = "X-Distill-Signature"


class DeliveryError(Exception):
    """A try that may succeed later: no answer, or an answer other than 2xx."""


class Refused(Exception):
    """A delivery that can never succeed: its host is not a public address, or no secret signs it."""


# -- where a webhook may go ---------------------------------------------------------------------


# IPv6 forms that carry an IPv4 address in their last 32 bits and reach it: NAT64's well-known prefix
# (RFC 6052) and the deprecated IPv4-compatible addresses (::a.b.c.d); IPv4-mapped ones (::ffff:a.b.c.d)
# are `ipv4_mapped`. NAT64's local-use prefix (RFC 8215) translates to addresses of the operator's choosing.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A global unicast address; an IPv6 one that carries an IPv4 address (mapped, compatible, NAT64,
    or tunnelled by 6to4 or Teredo) only if the IPv4 address it reaches is public too."""
    if address.version == 6:
        if address.ipv4_mapped or address in NAT64 or address in IPV4_COMPATIBLE:
            return _is_public(ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF))  # ::ffff:10.0.0.1 is 10.0.0.1
        if address in NAT64_LOCAL_USE:
            return False
        tunnelled = [address.sixtofour] if address.sixtofour else list(address.teredo or ())
        if not all(_is_public(inner) for inner in tunnelled):
            return False
    return address.is_global and not address.is_multicast


def url_problem(url: str, settings: Settings) -> str | None:
    """Why a webhook URL is refused before anything is sent, if it is: its host is written as a
    non-public address (`localhost`, `10.0.0.1`). Names are looked up only when a message is sent
    (`_resolve`): their addresses may change until then anyway."""
    if settings.webhook_allow_private:
        return None
    host = (urlsplit(url).hostname or "").rstrip(".")
    try:
        private = host == "localhost" or host.endswith(".localhost") or not _is_public(ipaddress.ip_address(host))
    except ValueError:  # a name, not an address
        return None
    if private:
        return (
            f"{host} is not a public address; this service sends webhooks only to public addresses "
            "(DISTILL_WEBHOOK_ALLOW_PRIVATE)"
        )
    return None


async def _resolve(host: str, port: int, settings: Settings) -> str:
    """The address to send to: the host's first address, once every address it has is allowed."""
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise DeliveryError(f"cannot resolve {host}: {err}") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not settings.webhook_allow_private:
        for address in addresses:
            if not _is_public(address):
                raise Refused(
                    f"{host} resolves to {address}, not a public address (DISTILL_WEBHOOK_ALLOW_PRIVATE is off)"
                )
    return str(addresses[0])


# -- the user's webhook and secret --------------------------------------------------------------


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


class UrlRefused(ValueError):
    """A webhook URL this service will not send to (`url_problem` says why)."""


def set_user_webhook(
    session: Session, user: User, url: str | None, settings: Settings, *, clear: bool = False, rotate: bool = False
) -> str | None:
    """Set (or with `clear`, remove) the user's default webhook URL, after the same check as a spec's
    (UrlRefused). A secret is made when the user has none yet, or with `rotate`; returns it then (the
    only time it is shown), else None."""
    if url is not None and not clear and (problem := url_problem(url, settings)):
        raise UrlRefused(problem)
    if clear:
        user.webhook_url = None
    elif url is not None:
        user.webhook_url = url
    made = None
    if rotate or not user.webhook_secret:
        made = user.webhook_secret = new_secret()
    session.commit()
    return made


def spec_problems(notify_url: str | None, user: User, settings: Settings) -> list[tuple[tuple[str, ...], str]]:
    """Problems with a job request's notify.webhook_url, by field, for the API's 422."""
    if notify_url is None:
        return []
    loc = ("notify", "webhook_url")
    problems = [(loc, problem)] if (problem := url_problem(notify_url, settings)) else []
    if not user.webhook_secret:
        problems.append(
            (
                loc,
                f"user {user.name!r} has no webhook secret to sign messages with; make one with "
                "`distill webhook --new-secret` (PUT /api/v1/me/webhook)",
            )
        )
    return problems


# -- the outbox ---------------------------------------------------------------------------------


def _iso(value) -> str | None:
    return value.isoformat() if value else None


def payload(job: Job, delivery_id: str) -> dict:
    """The message: what ended, how, and where to read more (API paths, under the service's URL)."""
    base = f"/api/v1/jobs/{job.id}"
    return {
        "id": delivery_id,
        "type": f"job.{job.status}",
        "job": {
            "id": job.id,
            "name": job.name,
            "status": job.status,
            "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
            "best_eval": job.best_eval,
            "attempts": job.attempts,
            "created_at": _iso(job.created_at),
            "started_at": _iso(job.started_at),
            "finished_at": _iso(job.finished_at),
        },
        "links": {
            "job": base,
            "events": f"{base}/events",
            "evals": f"{base}/evals",
            "checkpoints": f"{base}/checkpoints",
            "best_checkpoint": f"{base}/checkpoints/best/archive",
        },
    }


def stage_delivery(session: Session, job_id: str) -> None:
    """Add the job's delivery, if it has a webhook, to the session's transaction (the one that ended
    the job; not committed here). The job's own webhook comes first, then the user's default."""
    job = session.get(Job, job_id, populate_existing=True)  # as the transaction's update left it
    url = job.webhook_url or session.get(User, job.user_id).webhook_url
    if url:
        delivery_id = new_id("whd")
        session.add(
            WebhookDelivery(id=delivery_id, job_id=job.id, url=url, payload=payload(job, delivery_id), status=PENDING)
        )


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def deliver_due(limit: int = 20, stop: threading.Event | None = None) -> list[str]:
    """Send due deliveries (this reaper's share: each is claimed first), until `stop` is set; the
    ids delivered."""
    settings = get_settings()
    Session = session_factory()
    with Session() as session:
        now = db_now(session)
        due = session.scalars(
            select(WebhookDelivery.id).where(*_claimable(now)).order_by(WebhookDelivery.created_at).limit(limit)
        ).all()
    delivered, deadline = [], time.monotonic() + ROUND_SECONDS
    for delivery_id in due:
        if time.monotonic() > deadline or (stop is not None and stop.is_set()):
            break
        if _deliver(Session, delivery_id, settings):
            delivered.append(delivery_id)
    return delivered


def _claimable(now):
    return (
        WebhookDelivery.status == PENDING,
        or_(WebhookDelivery.next_attempt_at.is_(None), WebhookDelivery.next_attempt_at <= now),
        or_(WebhookDelivery.claimed_until.is_(None), WebhookDelivery.claimed_until < now),
    )


def _deliver(Session, delivery_id: str, settings: Settings) -> bool:
    """Claim one delivery, send it, record how it went; True if the receiver accepted it."""
    # The lease outlasts a round (its tries, each bounded by the timeout, and the waits between
    # them), so no other reaper takes the row while this one may still be sending it.
    lease = timedelta(seconds=TRIES * settings.webhook_timeout_seconds + 10)
    with Session() as session:
        now = db_now(session)
        attempt = session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, *_claimable(now))
            .values(claimed_until=now + lease, attempts=WebhookDelivery.attempts + 1)
            .returning(WebhookDelivery.attempts)
        ).scalar()
        session.commit()
        if attempt is None:
            return False  # another reaper has it, or has sent it
        delivery = session.get(WebhookDelivery, delivery_id)
        secret = session.scalar(
            select(User.webhook_secret).join(Job, Job.user_id == User.id).where(Job.id == delivery.job_id)
        )
        url, message = delivery.url, delivery.payload
    try:
        if not secret:
            raise Refused("the user has no webhook secret (`distill webhook --new-secret` makes one)")
        for retrying in Retrying(
            stop=stop_after_attempt(TRIES),
            wait=wait_exponential(multiplier=0.5, max=4),
            retry=retry_if_exception_type(DeliveryError),
            reraise=True,
        ):
            with retrying:
                _send(url, message, secret, settings)
    except Exception as err:  # a failed round, whatever failed: counted, so that the attempts run out
        error = str(err) if isinstance(err, (DeliveryError, Refused)) else f"{type(err).__name__}: {err}"
        final = isinstance(err, Refused) or attempt >= settings.webhook_max_attempts
        _record_failure(Session, delivery_id, attempt, error, final, settings)
        return False
    with Session() as session:  # recorded whoever holds the row now: it was delivered
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == PENDING)
            .values(status=DELIVERED, delivered_at=db_now(session), claimed_until=None, last_error=None)
        )
        session.commit()
    return True


def _record_failure(Session, delivery_id: str, attempt: int, error: str, final: bool, settings: Settings) -> None:
    """Schedule the next round, or give up; only while this round's claim still holds the row."""
    with Session() as session:
        now = db_now(session)
        delay = min(settings.webhook_retry_seconds * 2 ** (attempt - 1), MAX_DELAY)
        values = dict(status=FAILED) if final else dict(next_attempt_at=now + timedelta(seconds=delay))
        session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == PENDING,
                WebhookDelivery.attempts == attempt,
            )
            .values(claimed_until=None, last_error=error[:2000], **values)
        )
        session.commit()
    (log.error if final else log.warning)(
        "webhook %s, round %d: %s%s",
        delivery_id,
        attempt,
        error,
        "; given up" if final else f"; trying again in {delay:.0f} s",
    )


def _send(url: str, message: dict, secret: str, settings: Settings) -> None:
    """One POST; raises DeliveryError unless the answer is 2xx. The whole try (lookup, connecting,
    sending, the answer's headers) is bounded: a receiver that answers a byte at a time must not
    hold up the reaper, whose other work is the service's."""
    try:
        anyio.run(_post, url, message, secret, settings)
    except TimeoutError:
        raise DeliveryError(f"no answer within {settings.webhook_timeout_seconds:g} s") from None


def _tls(settings: Settings) -> ssl.SSLContext:
    """What an https receiver's certificate is checked against: the public CAs (httpx's default,
    certifi's), and the operator's own CAs where DISTILL_WEBHOOK_CA_FILE names them."""
    context = httpx.create_ssl_context(trust_env=False)
    if settings.webhook_ca_file:
        context.load_verify_locations(cafile=settings.webhook_ca_file)
    return context


async def _post(url: str, message: dict, secret: str, settings: Settings) -> None:
    with anyio.fail_after(settings.webhook_timeout_seconds):
        target = httpx.URL(url)
        address = await _resolve(target.host, target.port or (443 if target.scheme == "https" else 80), settings)
        body = json.dumps(message, separators=(",", ":"), sort_keys=True).encode()
        headers = {
            "Host": target.netloc.decode("ascii"),
            "Content-Type": "application/json",
            "User-Agent": "distill-webhooks/1",
            "X-Distill-Event": message["type"],
            "X-Distill-Delivery": message["id"],
            SIGNATURE_HEADER: sign(secret, int(time.time()), body),
        }
        # Connect to the checked address; TLS still checks the certificate against the URL's host name.
        request = httpx.Request(
            "POST",
            target.copy_with(host=address),
            headers=headers,
            content=body,
            extensions={"sni_hostname": target.host} if target.scheme == "https" else {},
        )
        try:
            # trust_env off: no proxy from the environment, which would connect to the name instead.
            async with httpx.AsyncClient(trust_env=False, follow_redirects=False, verify=_tls(settings)) as http:
                response = await http.send(request, stream=True)  # the receiver's body is not read
                await response.aclose()
        except httpx.HTTPError as err:
            raise DeliveryError(f"{type(err).__name__}: {err}") from None
    if not 200 <= response.status_code < 300:
        raise DeliveryError(f"the receiver answered {response.status_code}")
