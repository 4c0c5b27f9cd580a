from django.apps import AppConfig


class BuildsConfig(AppConfig):
    name = "builds"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from builds.metrics import DatabaseCollector
        from builds.services.retention import connect_file_cleanup
        from harmont.metrics import register_scrape_collector
        from harmont.pg_timestamps import use_native_timestamp_loader

        connect_file_cleanup()
        use_native_timestamp_loader()
        register_scrape_collector(DatabaseCollector())
