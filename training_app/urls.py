from django.urls import path

from . import views

app_name = "training_app"

urlpatterns = [
    path("tasks/<slug:slug>/datasets/upload", views.dataset_upload, name="dataset_upload"),
    path("tasks/<slug:slug>/train", views.training_new, name="training_new"),
    path("datasets/<int:pk>/", views.dataset_detail, name="dataset_detail"),
    path("datasets/<int:pk>/delete", views.dataset_delete, name="dataset_delete"),
    path("jobs/<int:pk>/", views.job_detail, name="job_detail"),
    path("jobs/<int:pk>/status", views.job_status, name="job_status"),
    path("jobs/<int:pk>/cancel", views.job_cancel, name="job_cancel"),
]
