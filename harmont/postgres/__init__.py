"""Django's PostgreSQL backend with a health check that asks the server only when in doubt, and a cursor
whose statements are prepared (see base)."""
