"""Forms for dataset uploads and the "train new version" button."""

from __future__ import annotations

from django import forms
from django.utils.translation import gettext_lazy as _

from adapters_app.serving.base import TARGETABLE_MODULES
from adapters_app.services import ServiceError

from .dataset_services import MIN_MAX_LENGTH, upload_options
from .ingest import MAX_EXAMPLE_TOKENS, ON_TOO_LONG_REJECT, ON_TOO_LONG_TRUNCATE
from .models import Dataset


class DatasetUploadForm(forms.Form):
    """A dataset file and the upload options. The file comes last so that, when the file is
    over the size limit and its reading stops, the options before it in the request body are
    still there to show again."""

    # Options left out of the request (a script that posts only the file) take their defaults.
    max_length = forms.IntegerField(
        label=_("Maximum length (GPT-2 tokens)"),
        min_value=MIN_MAX_LENGTH,
        max_value=MAX_EXAMPLE_TOKENS,
        initial=MAX_EXAMPLE_TOKENS,
        required=False,
        help_text=_("Longest example: prompt, completion and end-of-text token together, at most 1024."),
    )
    on_too_long = forms.ChoiceField(
        label=_("Longer examples"),
        choices=[
            (ON_TOO_LONG_REJECT, _("Reject the file and list them")),
            (ON_TOO_LONG_TRUNCATE, _("Cut their completions to the maximum length")),
        ],
        initial=ON_TOO_LONG_REJECT,
        required=False,
    )
    drop_duplicates = forms.BooleanField(
        label=_("Drop exact duplicates"),
        required=False,
        help_text=_("Keep only the first copy of examples that repeat exactly; duplicates are counted either way."),
    )
    prompt_column = forms.CharField(
        label=_("Prompt column or key"),
        required=False,
        max_length=255,
        help_text=_("Only for CSV, TSV or JSONL files with other column or key names; leave empty for the standard ones."),
    )
    completion_column = forms.CharField(
        label=_("Completion column or key"),
        required=False,
        max_length=255,
        help_text=_("With no prompt column, this column's text makes text-only examples."),
    )
    file = forms.FileField(
        label=_("Dataset file"),
        help_text=_(
            "JSONL (prompt/completion, text or chat messages), CSV or TSV (prompt,completion, "
            "source,target or text) or plain text with blank lines between examples; "
            "each may be compressed as .gz."
        ),
    )

    def clean(self) -> dict:
        data = super().clean()
        if self.errors:
            return data
        try:
            data["options"] = upload_options(
                max_length=data["max_length"] or MAX_EXAMPLE_TOKENS,
                on_too_long=data["on_too_long"] or ON_TOO_LONG_REJECT,
                drop_duplicates=data["drop_duplicates"],
                prompt_column=data["prompt_column"],
                completion_column=data["completion_column"],
            )
        except ServiceError as error:
            raise forms.ValidationError(error.message, code=error.code) from None
        return data


class TrainForm(forms.Form):
    """"Train new version": datasets, where to start, a preset and any values that override it.

    Empty hyperparameter fields take the preset's value; the trainer validates the result
    again and names any value out of range.
    """

    START_ACTIVE = "active"
    START_FRESH = "fresh"

    datasets = forms.ModelMultipleChoiceField(
        label=_("Datasets"), queryset=Dataset.objects.none(), widget=forms.CheckboxSelectMultiple
    )
    start = forms.ChoiceField(label=_("Start from"), widget=forms.RadioSelect)
    preset = forms.ChoiceField(
        label=_("Preset"),
        choices=[
            ("quick", _("Quick: rank 4, one epoch")),
            ("balanced", _("Balanced: rank 8, three epochs")),
            ("thorough", _("Thorough: rank 16, five epochs, cosine schedule")),
        ],
        initial="balanced",
        help_text=_("Leave a field below empty to use the preset's value."),
    )
    rank = forms.IntegerField(label=_("LoRA rank"), min_value=1, max_value=256, required=False)
    alpha = forms.FloatField(label=_("LoRA alpha"), min_value=0.001, max_value=1024, required=False)
    dropout = forms.FloatField(label=_("LoRA dropout"), min_value=0.0, max_value=0.99, required=False)
    target_modules = forms.MultipleChoiceField(
        label=_("Target modules"),
        choices=[(name, name) for name in TARGETABLE_MODULES],
        initial=list(TARGETABLE_MODULES),
        widget=forms.CheckboxSelectMultiple,
        required=False,
    )
    learning_rate = forms.FloatField(label=_("Learning rate"), min_value=1e-7, max_value=1.0, required=False)
    lr_schedule = forms.ChoiceField(
        label=_("Learning rate schedule"),
        choices=[("", _("preset's")), ("linear", _("linear decay")), ("cosine", _("cosine")), ("constant", _("constant"))],
        required=False,
    )
    warmup_ratio = forms.FloatField(label=_("Warmup (fraction of steps)"), min_value=0.0, max_value=0.99, required=False)
    epochs = forms.IntegerField(label=_("Epochs"), min_value=1, max_value=100, required=False)
    max_steps = forms.IntegerField(label=_("Max steps"), min_value=1, required=False)
    batch_size = forms.IntegerField(label=_("Batch size"), min_value=1, max_value=256, required=False)
    gradient_accumulation_steps = forms.IntegerField(
        label=_("Gradient accumulation steps"), min_value=1, max_value=1024, required=False
    )
    max_length = forms.IntegerField(label=_("Max length (tokens)"), min_value=8, max_value=1024, required=False)
    seed = forms.IntegerField(label=_("Seed"), min_value=0, max_value=2**32 - 1, required=False)

    HYPERPARAMETER_FIELDS = (
        "rank", "alpha", "dropout", "learning_rate", "lr_schedule", "warmup_ratio", "epochs", "max_steps",
        "batch_size", "gradient_accumulation_steps", "max_length", "seed",
    )

    def __init__(self, *args, task, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["datasets"].queryset = task.datasets.order_by("-created_at")
        choices = [(self.START_FRESH, _("Fresh adapter"))]
        if task.active_version is not None:
            label = _("Active version %(version)s (warm start)") % {"version": task.active_version.label}
            choices.insert(0, (self.START_ACTIVE, label))
        self.fields["start"].choices = choices
        self.fields["start"].initial = choices[0][0]

        # Most often a new version trains on the dataset uploaded last.
        newest = self.fields["datasets"].queryset.first()
        if newest is not None:
            self.fields["datasets"].initial = [newest.pk]

        # Show the balanced preset's values, the defaults, as placeholders; the page's script
        # swaps in another preset's values when that preset is chosen.
        for name, value in self.preset_placeholders()["balanced"].items():
            self.fields[name].widget.attrs["placeholder"] = value

    def preset_placeholders(self) -> dict[str, dict[str, str]]:
        """Return, per preset, the value each empty hyperparameter field would take."""
        from .trainer_config import PRESETS, TrainingConfig

        placeholders: dict[str, dict[str, str]] = {}
        for preset in PRESETS:
            config = TrainingConfig.from_dict({"preset": preset})
            placeholders[preset] = {
                name: str(getattr(config, name))
                for name in self.HYPERPARAMETER_FIELDS
                if getattr(config, name) is not None and not isinstance(self.fields[name], forms.ChoiceField)
            }
        return placeholders

    def hyperparameters(self) -> dict:
        data = self.cleaned_data
        values: dict = {"preset": data["preset"]}
        for name in self.HYPERPARAMETER_FIELDS:
            if data.get(name) not in (None, ""):
                values[name] = data[name]
        if data.get("target_modules"):
            values["target_modules"] = list(data["target_modules"])
        return values
