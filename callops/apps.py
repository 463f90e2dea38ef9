from django.apps import AppConfig


class CallopsConfig(AppConfig):
    name = "callops"
    verbose_name = "callops"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from callops import checks  # noqa: F401  (registers the system checks)
