"""Who looks at a build page: a member of its organization, or, for a public pipeline, anyone.

A pipeline with `visibility: public` shows its history, build pages, job logs,
live log streams and artifacts to signed-out visitors (and to people signed in
who are not members), read-only: no forms, and nothing of who triggered a build.
Members see their organization's pages as always. Anything else is what it
was: a signed-out visitor signs in, a signed-in stranger gets a 404.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

from django.contrib.auth.views import redirect_to_login
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse

from builds.models import Build
from builds.selectors import public_build, scoped_build
from organizations.models import Organization
from organizations.views import OrgPage, org_page
from pipelines.models import Pipeline, Visibility


class SignInRequired(Exception):
    """A signed-out visitor asked for something only members see."""


@dataclass(frozen=True)
class Viewer:
    """The organization a page is about, and the member looking (None: a visitor of a public pipeline)."""

    org: Organization
    page: OrgPage | None

    @property
    def is_member(self) -> bool:
        return self.page is not None

    def context(self, **extra: Any) -> dict[str, Any]:
        """The page's template context: a member's (`OrgPage.context`), or a visitor's, who may act on nothing."""
        if self.page is not None:
            return self.page.context(can_act=True, **extra)
        return {"org": self.org, "membership": None, "is_org_admin": False, "can_act": False, "visitor": True,
                **extra}


def _member_page(request: HttpRequest, org: str) -> OrgPage | None:
    if not request.user.is_authenticated:
        return None
    try:
        return org_page(request, org)
    except Http404:
        return None


def viewed_build(request: HttpRequest, org: str, pipeline: str, number: int) -> tuple[Viewer, Build]:
    """The build through the caller's membership, else of a public pipeline; 404 or SignInRequired otherwise.

    A member's build is the one query it always was (`scoped_build`); a
    visitor's is one query too.
    """
    page = _member_page(request, org)
    if page is not None:
        build = scoped_build(org_slug=page.org.slug, pipeline_slug=pipeline, number=number,
                             user=page.membership.user, for_page=True)
        if build is None:
            raise Http404(f"No build {number} in pipeline {pipeline!r}.")
        build.pipeline.organization = page.org
        return Viewer(page.org, page), build
    build = public_build(org_slug=org, pipeline_slug=pipeline, number=number)
    if build is None:
        if not request.user.is_authenticated:
            raise SignInRequired
        raise Http404(f"No build {number} in pipeline {pipeline!r}.")
    return Viewer(build.pipeline.organization, None), build


def viewed_pipeline(request: HttpRequest, org: str, pipeline: str) -> tuple[Viewer, Pipeline]:
    """The pipeline through the caller's membership, else a public one; 404 or SignInRequired otherwise."""
    page = _member_page(request, org)
    if page is not None:
        found = Pipeline.objects.for_org(page.org).filter(slug=pipeline).first()
        if found is None:
            raise Http404(f"No pipeline {pipeline!r}.")
        found.organization = page.org
        return Viewer(page.org, page), found
    found = (Pipeline.objects.select_related("organization")
             .filter(organization__slug=org, slug=pipeline, archived_at__isnull=True, visibility=Visibility.PUBLIC)
             .first())
    if found is None:
        if not request.user.is_authenticated:
            raise SignInRequired
        raise Http404(f"No pipeline {pipeline!r}.")
    return Viewer(found.organization, None), found


def _answering_sign_in(answer: Callable[[HttpRequest], HttpResponse]
                       ) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """A view decorator: `SignInRequired` from the view is answered with `answer(request)`."""

    def decorate(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            try:
                return view(request, *args, **kwargs)
            except SignInRequired:
                return answer(request)

        return wrapper

    return decorate


# For pages a public pipeline shows to anyone: a signed-out visitor of anything else signs in first.
members_or_public = _answering_sign_in(lambda request: redirect_to_login(request.get_full_path()))
# The same for the build page's JSON helpers: 401 JSON, which the page's script reads.
members_or_public_json = _answering_sign_in(lambda request: JsonResponse(
    {"error": "signed_out", "message": "Sign in again to follow this build."}, status=401))
