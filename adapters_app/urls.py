from django.urls import path

from . import account_views, views

app_name = "adapters_app"

# Pages that never need the model, served by every role but "inference".
page_urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("demo/load", views.demo_load, name="demo_load"),
    path("playground/", views.playground, name="playground"),
    path("tasks/<slug:slug>/", views.task_detail, name="task_detail"),
    path("tasks/<slug:slug>/compare", views.task_compare, name="task_compare"),
    path("tasks/<slug:slug>/delete", views.task_delete_view, name="task_delete"),
    path("tasks/<slug:slug>/versions/<int:number>/activate", views.version_activate_view, name="version_activate"),
    path("tasks/<slug:slug>/versions/<int:number>/export", views.version_export_view, name="version_export"),
    path("tasks/<slug:slug>/versions/import", views.version_import_view, name="version_import"),
    path("accounts/", account_views.account, name="account"),
    path("accounts/tokens/<int:pk>/revoke", account_views.api_token_revoke_view, name="api_token_revoke"),
]

# Generation endpoints, served by the "inference" and "all" roles. The "dashboard" role mounts
# them too, so pages can link to them, but answers 503 there (see inference.get_engine).
inference_urlpatterns = [
    path("playground/stream", views.playground_stream, name="playground_stream"),
]

urlpatterns = page_urlpatterns + inference_urlpatterns
