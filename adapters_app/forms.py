"""Forms for tasks and the playground."""

from __future__ import annotations

from django import forms
from django.utils.translation import gettext_lazy as _

from .models import Task, slug_validator


class TaskForm(forms.Form):
    slug = forms.CharField(
        label=_("Slug"),
        max_length=64,
        validators=[slug_validator],
        help_text=_("Used in URLs and as the model name in the API, e.g. “poetry”."),
    )
    name = forms.CharField(label=_("Name"), max_length=200)
    description = forms.CharField(label=_("Description"), required=False, widget=forms.Textarea(attrs={"rows": 2}))


class PlaygroundForm(forms.Form):
    task = forms.ModelChoiceField(label=_("Task"), queryset=Task.objects.all(), to_field_name="slug")
    version = forms.IntegerField(
        label=_("Version"),
        required=False,
        min_value=1,
        help_text=_("Leave empty to use the active version."),
    )
    prompt = forms.CharField(label=_("Prompt"), widget=forms.Textarea(attrs={"rows": 4}), max_length=20000)
    max_tokens = forms.IntegerField(label=_("Max new tokens"), min_value=1, max_value=1024, initial=48)
    temperature = forms.FloatField(label=_("Temperature"), min_value=0.0, max_value=5.0, initial=0.0)
    top_p = forms.FloatField(label=_("Top-p"), min_value=0.01, max_value=1.0, initial=1.0)

    def model_name(self) -> str:
        task = self.cleaned_data["task"]
        version = self.cleaned_data.get("version")
        return f"{task.slug}@v{version}" if version else task.slug


class ReasonForm(forms.Form):
    reason = forms.CharField(label=_("Reason"), max_length=2000, widget=forms.Textarea(attrs={"rows": 2}))
