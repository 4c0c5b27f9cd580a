"""The webhooks page of an organization: its outbound webhook endpoints, a form to add one, and each one's deliveries.

For admins and owners, like the agents page: a member gets a 403 saying why,
anyone else a 404. Writes go through the same services as the API and the admin.
"""

from __future__ import annotations

import uuid

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Count, Prefetch, Q
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from builds import services
from builds.models import Notification, NotificationAttempt, NotificationStatus, WebhookEndpoint, WebhookEvent
from builds.services.webhook_endpoints import IssuedEndpoint
from harmont.errors import ApiError
from organizations.views import OrgPage, admin_org_page

# The endpoint's page shows this many of its deliveries, newest first; the API pages through them all.
DELIVERIES_ON_PAGE = 50


class WebhookEndpointForm(forms.Form):
    # Only "required" here: the service's rules say what else is wrong, in the words the API uses.
    url = forms.CharField(label="URL", help_text="Where the events are POSTed, e.g. https://hooks.example.com/harmont.")
    description = forms.CharField(required=False, help_text="What it is, for people.")
    events = forms.MultipleChoiceField(choices=WebhookEvent.choices, widget=forms.CheckboxSelectMultiple,
                                       required=False, initial=WebhookEvent.values)


def _page_endpoint(page: OrgPage, endpoint_id: uuid.UUID) -> WebhookEndpoint:
    try:
        return services.get_webhook_endpoint(organization=page.org, endpoint_id=endpoint_id)
    except ApiError as exc:  # webhook_not_found: a page's 404
        raise Http404(exc.message) from None


def _webhooks_page(request: HttpRequest, page: OrgPage, *, form: WebhookEndpointForm,
                   created: IssuedEndpoint | None = None, status: int = 200) -> HttpResponse:
    endpoints = (WebhookEndpoint.objects.filter(organization=page.org).select_related("created_by")
                 .annotate(queued=Count("notifications", filter=Q(notifications__status=NotificationStatus.QUEUED)),
                           failed=Count("notifications", filter=Q(notifications__status=NotificationStatus.FAILED)))
                 .order_by("created_at", "pk"))
    return render(request, "builds/webhooks.html", page.context(endpoints=endpoints, form=form, created=created),
                  status=status)


@login_required
def webhooks(request: HttpRequest, org: str) -> HttpResponse:
    """The organization's webhook endpoints; POST adds one (its secret is shown once, on the answer)."""
    page = admin_org_page(request, org, action="manage webhooks")
    if request.method != "POST":
        return _webhooks_page(request, page, form=WebhookEndpointForm())
    form = WebhookEndpointForm(request.POST)
    if form.is_valid():
        data = form.cleaned_data
        try:
            issued = services.create_webhook_endpoint(organization=page.org, url=data["url"], events=data["events"],
                                                      description=data["description"],
                                                      created_by=request.user)  # type: ignore[arg-type]
        except ApiError as exc:
            for name, errors in (exc.fields or {}).items():
                form.add_error(name if name in form.fields else None, errors)
            if not exc.fields:  # webhook_limit
                form.add_error(None, exc.message)
        else:
            return _webhooks_page(request, page, form=WebhookEndpointForm(), created=issued)
    return _webhooks_page(request, page, form=form, status=422)


@login_required
@require_POST
def delete_webhook(request: HttpRequest, org: str, endpoint_id: uuid.UUID) -> HttpResponse:
    page = admin_org_page(request, org, action="manage webhooks")
    endpoint = _page_endpoint(page, endpoint_id)
    services.delete_webhook_endpoint(endpoint=endpoint)
    messages.success(request, f"Deleted the webhook endpoint {endpoint.url}; nothing more is sent to it.")
    return redirect("builds_ui:webhooks", org=page.org.slug)


@login_required
def webhook_deliveries(request: HttpRequest, org: str, endpoint_id: uuid.UUID) -> HttpResponse:
    """The endpoint's newest deliveries, each with its build and every attempt's answer."""
    page = admin_org_page(request, org, action="manage webhooks")
    endpoint = _page_endpoint(page, endpoint_id)
    deliveries = list(
        Notification.objects.filter(endpoint=endpoint).select_related("build__pipeline").defer("payload")
        .prefetch_related(Prefetch("attempts_made", queryset=NotificationAttempt.objects.order_by("at", "id")))
        .order_by("-id")[:DELIVERIES_ON_PAGE])
    return render(request, "builds/webhook_deliveries.html",
                  page.context(endpoint=endpoint, deliveries=deliveries, shown=DELIVERIES_ON_PAGE))
