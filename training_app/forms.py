"""Forms for dataset uploads and the "train new version" button."""

from __future__ import annotations

from django import forms
from django.utils.translation import gettext_lazy as _

from adapters_app.serving.base import TARGETABLE_MODULES

from .models import Dataset


class DatasetUploadForm(forms.Form):
    file = forms.FileField(
        label=_("Dataset file"),
        help_text=_("JSONL (prompt/completion or text), CSV (prompt,completion or source,target) or plain text."),
    )


class TrainForm(forms.Form):
    """Hyperparameters offered in the browser; the trainer validates the same values again."""

    START_ACTIVE = "active"
    START_FRESH = "fresh"

    datasets = forms.ModelMultipleChoiceField(
        label=_("Datasets"), queryset=Dataset.objects.none(), widget=forms.CheckboxSelectMultiple
    )
    start = forms.ChoiceField(label=_("Start from"), widget=forms.RadioSelect)
    rank = forms.IntegerField(label=_("LoRA rank"), min_value=1, max_value=256, initial=8)
    alpha = forms.FloatField(label=_("LoRA alpha"), min_value=0.001, max_value=4096, initial=16)
    target_modules = forms.MultipleChoiceField(
        label=_("Target modules"),
        choices=[(name, name) for name in TARGETABLE_MODULES],
        initial=list(TARGETABLE_MODULES),
        widget=forms.CheckboxSelectMultiple,
    )
    learning_rate = forms.FloatField(label=_("Learning rate"), min_value=1e-7, max_value=1.0, initial=5e-4)
    epochs = forms.IntegerField(label=_("Epochs"), min_value=1, max_value=100, initial=3)
    batch_size = forms.IntegerField(label=_("Batch size"), min_value=1, max_value=256, initial=8)
    max_length = forms.IntegerField(label=_("Max length (tokens)"), min_value=8, max_value=1024, initial=256)

    def __init__(self, *args, task, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["datasets"].queryset = task.datasets.order_by("-created_at")
        choices = [(self.START_FRESH, _("Fresh adapter"))]
        if task.active_version is not None:
            label = _("Active version %(version)s (warm start)") % {"version": task.active_version.label}
            choices.insert(0, (self.START_ACTIVE, label))
        self.fields["start"].choices = choices
        self.fields["start"].initial = choices[0][0]

    def hyperparameters(self) -> dict:
        data = self.cleaned_data
        return {
            "rank": data["rank"],
            "alpha": data["alpha"],
            "target_modules": list(data["target_modules"]),
            "learning_rate": data["learning_rate"],
            "epochs": data["epochs"],
            "batch_size": data["batch_size"],
            "max_length": data["max_length"],
        }
