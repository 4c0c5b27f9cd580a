"""WSGI entry point (gunicorn serves `harmont.wsgi:application`)."""
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "harmont.settings")
application = get_wsgi_application()
