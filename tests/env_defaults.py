"""Test-run defaults, loaded as a pytest plugin (`-p`) so they are set before Django reads its settings."""
import os

os.environ.setdefault("HARMONT_SECRET_KEY", "test-secret-key-not-for-production")
os.environ.setdefault("HARMONT_PUBLIC_URL", "http://testserver")
os.environ.setdefault("HARMONT_ALLOWED_HOSTS", "testserver,localhost,127.0.0.1")
