"""Label Studio project identity, the same whichever way Label Studio names the project.

/setup and /predict send ``"<id>.<created_at as an integer timestamp>"``; webhooks send the
project object. Both become that uid, which a project re-created after a database reset (same
id, new creation time) never shares with the old one.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from common.errors import BadRequest

_UID = re.compile(r"(\d{1,18})\.(\d{1,18})", re.ASCII)  # Arabic-Indic digits are digits to \d otherwise


def project_uid(project: Any) -> str:
    """The uid of ``project``: a uid string as /predict sends it, or a webhook's project object."""
    if isinstance(project, str) and _UID.fullmatch(project):
        return project
    if isinstance(project, dict) and type(project.get("id")) is int and project.get("created_at"):
        try:
            stamp = int(datetime.fromisoformat(str(project["created_at"])[:64].replace("Z", "+00:00")).timestamp())
        except (ValueError, OverflowError, OSError) as e:
            raise BadRequest(f"Unreadable project created_at {str(project['created_at'])[:64]!r}.") from e
        if not (0 <= stamp < 10**18 and 0 <= project["id"] < 10**18):
            raise BadRequest(
                f"Expected a Label Studio project with a positive id and creation time, got {project!r:.80}."
            )
        return f"{project['id']}.{stamp}"
    raise BadRequest(f"Expected a Label Studio project ('<id>.<created_at>' or a project object), got {project!r:.80}.")


def project_id(uid: str) -> int:
    """Label Studio's numeric project id inside a uid."""
    match = _UID.fullmatch(uid)
    if not match:
        raise BadRequest(f"Not a project uid: {uid!r}")
    return int(match.group(1))
