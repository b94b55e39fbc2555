"""``/dashboard``: the project manager's page. An overview of every project, and one project's
pre-labels, corrections, annotator time, versions (with rollback) and learning jobs. Served as
plain HTML with SVG charts drawn by the backend (``backend/charts.py``): no CDN, no script
library; behind the same basic auth as every other route."""

from __future__ import annotations

import time

from flask import Blueprint, render_template, request

from backend.dashboard import overview, project_view, service, when
from backend.routes import known_project
from backend.state import state

bp = Blueprint("dashboard", __name__)


@bp.get("/dashboard")
def dashboard():
    current = state()
    feedback = current.require_feedback()
    project = known_project(request.args.get("project"), feedback.projects)
    page = render_template(
        "dashboard.html",
        view=project_view(current, project) if project else None,
        projects=[] if project else overview(current),
        service=service(current),
        generated_at=when(time.time()),
        when=when,
    )
    # its Activate buttons must not be clickable through another site's frame
    headers = {"Content-Security-Policy": "frame-ancestors 'none'", "X-Frame-Options": "DENY"}
    return page, 200, headers
