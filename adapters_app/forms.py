"""Forms for tasks and the playground."""

from __future__ import annotations

from django import forms
from django.utils.translation import gettext_lazy as _

from .models import AdapterVersion, Task, slug_validator


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
    temperature = forms.FloatField(label=_("Temperature"), min_value=0.0, max_value=2.0, initial=0.0)
    top_p = forms.FloatField(label=_("Top-p"), min_value=0.01, max_value=1.0, initial=1.0)
    compare = forms.MultipleChoiceField(
        label=_("Compare side by side"),
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text=_("Answer through each checked version in one batch; with none checked, the version above answers."),
    )

    BASE_CHOICE = "base"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # The compare choices are the ready versions of the chosen task, plus the bare base.
        slug = self.data.get("task") or (self.initial or {}).get("task")
        task = Task.objects.filter(slug=slug).first() if slug else None
        choices = [(self.BASE_CHOICE, _("bare base (no adapter)"))]
        if task is not None:
            ready = task.versions.filter(status=AdapterVersion.Status.READY).order_by("number")
            choices += [(str(version.number), version.label) for version in ready]
        self.fields["compare"].choices = choices

    def model_name(self) -> str:
        task = self.cleaned_data["task"]
        version = self.cleaned_data.get("version")
        return f"{task.slug}@v{version}" if version else task.slug

    def compare_targets(self) -> list[int | None]:
        """Return the checked version numbers in choice order, None standing for the bare base."""
        checked = set(self.cleaned_data.get("compare") or [])
        return [
            None if value == self.BASE_CHOICE else int(value)
            for value, _label in self.fields["compare"].choices
            if value in checked
        ]


class ReasonForm(forms.Form):
    reason = forms.CharField(label=_("Reason"), max_length=2000, widget=forms.Textarea(attrs={"rows": 2}))


class TaskDeleteForm(forms.Form):
    """Deleting a task cannot be undone, so the user types its slug to confirm."""

    confirm_slug = forms.CharField(label=_("Type the task's slug to confirm"), max_length=64)
    reason = forms.CharField(label=_("Reason (kept in the audit log)"), required=False, widget=forms.Textarea(attrs={"rows": 2}))

    def __init__(self, *args, task: Task, **kwargs):
        super().__init__(*args, **kwargs)
        self.task = task

    def clean_confirm_slug(self) -> str:
        value = self.cleaned_data["confirm_slug"].strip()
        if value != self.task.slug:
            raise forms.ValidationError(
                _("“%(value)s” is not the slug of this task; type “%(slug)s” to delete it."),
                code="slug_mismatch",
                params={"value": value, "slug": self.task.slug},
            )
        return value


class CompareForm(forms.Form):
    versions = forms.MultipleChoiceField(label=_("Versions"), widget=forms.CheckboxSelectMultiple)
    include_base = forms.BooleanField(label=_("Include the bare base model"), required=False, initial=True)
    prompts = forms.CharField(
        label=_("Prompts"),
        widget=forms.Textarea(attrs={"rows": 4}),
        max_length=5000,
        help_text=_("One prompt per line; each column answers every prompt greedily."),
    )

    MAX_PROMPTS = 8

    def __init__(self, *args, versions, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["versions"].choices = [(str(version.number), version.label) for version in versions]

    def clean_prompts(self) -> str:
        prompts = [line.strip() for line in self.cleaned_data["prompts"].splitlines() if line.strip()]
        if not prompts:
            raise forms.ValidationError(_("Enter at least one prompt."), code="no_prompts")
        if len(prompts) > self.MAX_PROMPTS:
            raise forms.ValidationError(
                _("Enter at most %(limit)s prompts; there are %(count)s.") % {"limit": self.MAX_PROMPTS, "count": len(prompts)},
                code="too_many_prompts",
            )
        return "\n".join(prompts)

    def prompt_list(self) -> list[str]:
        return self.cleaned_data["prompts"].split("\n")


class ApiTokenForm(forms.Form):
    """Name and lifetime of a new API token."""

    NEVER = "never"

    name = forms.CharField(
        label=_("Name"),
        max_length=100,
        help_text=_("Say where the token is used, e.g. “nightly eval script”."),
    )
    lifetime = forms.ChoiceField(
        label=_("Expires"),
        choices=[
            ("30", _("in 30 days")),
            ("90", _("in 90 days")),
            ("365", _("in 365 days")),
            (NEVER, _("never")),
        ],
        initial="90",
    )

    def lifetime_days(self) -> int | None:
        value = self.cleaned_data["lifetime"]
        return None if value == self.NEVER else int(value)
