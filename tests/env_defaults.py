"""Test-run defaults, loaded as a pytest plugin (`-p`) so they are set before Django reads its settings."""
import os

os.environ.setdefault("HARMONT_SECRET_KEY", "test-secret-key-not-for-production")
os.environ.setdefault("HARMONT_PUBLIC_URL", "http://testserver")
os.environ.setdefault("HARMONT_ALLOWED_HOSTS", "testserver,localhost,127.0.0.1")
# Tests' webhook receivers listen on 127.0.0.1 (tests/test_outbound_post.py checks the refusal).
os.environ.setdefault("HARMONT_WEBHOOK_ALLOW_PRIVATE_ADDRESSES", "1")
