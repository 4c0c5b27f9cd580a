from django.apps import AppConfig


class BuildsConfig(AppConfig):
    name = "builds"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from builds.services.retention import connect_file_cleanup

        connect_file_cleanup()
