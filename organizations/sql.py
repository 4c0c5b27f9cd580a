"""The organizations app's raw SQL (see harmont/rows.py for when and how SQL is written here)."""

from __future__ import annotations

from django.db import connection

from harmont.rows import Columns, Table, first_row
from organizations.models import ApiToken, User

# Every API request runs this lookup: the ORM spent several times longer building
# and compiling it than PostgreSQL spends answering it. It loads what
# `ApiToken.objects.select_related("user")` loads: every column of both rows.
# Deliberately no cache in front of it: a revoked token stops working at once, in
# every process.
_T, _U = Table(ApiToken, "t"), Table(User, "u")
TOKEN_COLUMNS = Columns(ApiToken)
USER_COLUMNS = Columns(User)
TOKEN_WITH_USER_SQL = (
    f"SELECT {TOKEN_COLUMNS.select(_T)}, {USER_COLUMNS.select(_U)} "
    f"FROM {_T} JOIN {_U} ON {_U.id} = {_T.user} WHERE {_T.token_hash} = %s"
)


def token_with_user(digest: str) -> ApiToken | None:
    """The token whose hash is `digest`, its user loaded too; None if there is none."""
    cells = first_row(TOKEN_WITH_USER_SQL, [digest])
    if cells is None:
        return None
    token = TOKEN_COLUMNS.load(cells, connection)
    token.user = USER_COLUMNS.load(cells, connection)
    return token
