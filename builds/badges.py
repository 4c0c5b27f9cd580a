"""`GET /orgs/{org}/pipelines/{pipeline}/badge.svg?branch=`: the latest finished build's state, as an SVG badge.

For a README: a public pipeline's badge is anyone's (and any cache's, for a
minute); a private one's only a signed-in member's, 404 to everyone else, as
its pages are. The branch is the pipeline's default one unless `branch` names
another.
"""

from __future__ import annotations

from django.http import Http404, HttpRequest, HttpResponse
from django.template.loader import render_to_string
from django.views.decorators.http import require_GET

from builds.models import Build, BuildState
from builds.states import TERMINAL_BUILD_STATES
from builds.viewers import SignInRequired, viewed_pipeline
from pipelines.models import Visibility

BADGE_MAX_AGE_SECONDS = 60
# The state's word and colour (the build page's badge colours, with enough contrast for white text).
BADGE_LOOK = {
    BuildState.PASSED: ("passed", "#1f883d"),
    BuildState.FAILED: ("failed", "#cf222e"),
    BuildState.CANCELED: ("canceled", "#6e7781"),
    BuildState.SKIPPED: ("skipped", "#6e7781"),
    None: ("no builds", "#6e7781"),
}
LABEL = "build"
# Verdana 11px, what such badges are drawn in, averages about this many pixels per character.
CHAR_WIDTH = 6.5
PADDING = 10


def text_width(text: str) -> int:
    return round(len(text) * CHAR_WIDTH) + PADDING


@require_GET
def pipeline_badge(request: HttpRequest, org: str, pipeline: str) -> HttpResponse:
    """The badge of the latest finished build of the branch (two queries; a member's, three)."""
    try:
        _, pipe = viewed_pipeline(request, org, pipeline)
    except SignInRequired:
        # Not a redirect to the sign-in page: an <img> can't follow one anywhere useful, and a
        # private pipeline must not be told apart from one that doesn't exist.
        raise Http404(f"No pipeline {pipeline!r}.") from None
    branch = request.GET.get("branch") or pipe.default_branch
    state = (Build.objects.filter(pipeline=pipe, branch=branch, state__in=TERMINAL_BUILD_STATES)
             .order_by("-number").values_list("state", flat=True).first())
    word, colour = BADGE_LOOK.get(state, BADGE_LOOK[None])
    label_width, value_width = text_width(LABEL), text_width(word)
    svg = render_to_string("builds/badge.svg", {
        "label": LABEL, "value": word, "colour": colour, "title": f"{pipe.name} ({branch}): {word}",
        "label_width": label_width, "value_width": value_width, "width": label_width + value_width,
        "label_x": label_width / 2, "value_x": label_width + value_width / 2,
    })
    response = HttpResponse(svg, content_type="image/svg+xml; charset=utf-8")
    # A public pipeline's badge is the same for everyone; a private one's is for its members' browsers only.
    scope = "public" if pipe.visibility == Visibility.PUBLIC else "private"
    response["Cache-Control"] = f"{scope}, max-age={BADGE_MAX_AGE_SECONDS}"
    if scope == "private":
        response["Vary"] = "Cookie"
    return response
