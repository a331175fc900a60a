from django.urls import path

from . import views

app_name = "adapters_app"

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("demo/load", views.demo_load, name="demo_load"),
    path("playground/", views.playground, name="playground"),
    path("tasks/<slug:slug>/", views.task_detail, name="task_detail"),
    path("tasks/<slug:slug>/versions/<int:number>/activate", views.version_activate_view, name="version_activate"),
    path("tasks/<slug:slug>/versions/<int:number>/export", views.version_export_view, name="version_export"),
    path("tasks/<slug:slug>/versions/import", views.version_import_view, name="version_import"),
]
