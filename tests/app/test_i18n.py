"""Simplified Chinese catalog: complete, in step with the source and compiled, and used by pages."""

from __future__ import annotations

import ast
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.core.management import call_command
from django.urls import reverse
from django.utils.translation import gettext, override

from training_app.ingest import MESSAGE_TEMPLATES, DatasetInvalid, parse_dataset
from training_app.messages import problem_message

REPO_ROOT = Path(__file__).resolve().parents[2]
CATALOG_DIR = REPO_ROOT / "locale" / "zh_Hans" / "LC_MESSAGES"
PO_PATH = CATALOG_DIR / "django.po"
MO_PATH = CATALOG_DIR / "django.mo"

# Folders that the makemessages command in UPDATE_HINT skips with --ignore.
MAKEMESSAGES_IGNORE = [".venv", "var", "tests"]
# makemessages reads .py, .html and .txt files for the "django" domain, and .po files keep the
# translations.
SOURCE_SUFFIXES = {".py", ".html", ".txt", ".po"}

COMPILE_HINT = "run `.venv/bin/python manage.py compilemessages --ignore=.venv`"
UPDATE_HINT = (
    "run `.venv/bin/python manage.py makemessages -l zh_Hans --ignore=.venv --ignore=var "
    "--ignore=tests`, translate the new entries in locale/zh_Hans/LC_MESSAGES/django.po, "
    "then run `.venv/bin/python manage.py compilemessages --ignore=.venv`"
)

needs_gettext = pytest.mark.skipif(
    shutil.which("msgfmt") is None or shutil.which("msgmerge") is None,
    reason="GNU gettext (msgfmt, msgmerge) is not installed",
)


@dataclass
class PoEntry:
    msgid: str
    msgid_plural: str = ""
    msgctxt: str | None = None
    msgstrs: list[str] = field(default_factory=list)
    flags: set[str] = field(default_factory=set)

    @property
    def key(self) -> tuple[str | None, str, str]:
        return (self.msgctxt, self.msgid, self.msgid_plural)

    @property
    def is_header(self) -> bool:
        return self.msgid == "" and self.msgctxt is None


def read_po(path: Path) -> list[PoEntry]:
    """Parse the active entries of a .po file, skipping obsolete (#~) ones.

    Covers what GNU gettext writes for this project: comments, flags, msgctxt, msgid,
    msgid_plural, msgstr and msgstr[N], each possibly continued on following string lines.
    """
    entries: list[PoEntry] = []
    entry: PoEntry | None = None
    flags: set[str] = set()
    target: tuple[str, int] | None = None

    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#~"):
            target = None
            continue
        if line.startswith("#,"):
            flags |= {flag.strip() for flag in line[2:].split(",")}
            continue
        if line.startswith("#"):
            continue

        keyword, _, rest = line.partition(" ")
        if line.startswith('"'):
            if target is None or entry is None:
                raise ValueError(f"{path}:{number}: string line outside an entry: {raw!r}")
            text = ast.literal_eval(line)
        else:
            text = ast.literal_eval(rest)
            # A msgctxt starts an entry, and so does a msgid unless it follows that msgctxt.
            if keyword == "msgctxt" or (keyword == "msgid" and (entry is None or entry.msgstrs)):
                entry = PoEntry(msgid="", flags=flags)
                entries.append(entry)
                flags = set()
            if entry is None:
                raise ValueError(f"{path}:{number}: {keyword} before any msgid: {raw!r}")

            match = re.fullmatch(r"msgstr\[(\d+)\]", keyword)
            if keyword in ("msgctxt", "msgid", "msgid_plural"):
                target = (keyword, 0)
                if keyword == "msgctxt":
                    entry.msgctxt = ""
            elif keyword == "msgstr" or match:
                index = int(match.group(1)) if match else 0
                entry.msgstrs.append("")
                target = ("msgstr", index)
            else:
                raise ValueError(f"{path}:{number}: unknown keyword {keyword!r}")

        name, index = target
        if name == "msgctxt":
            entry.msgctxt = (entry.msgctxt or "") + text
        elif name == "msgid":
            entry.msgid += text
        elif name == "msgid_plural":
            entry.msgid_plural += text
        else:
            entry.msgstrs[index] += text

    return entries


def describe(entries: list[PoEntry]) -> str:
    return "\n".join(f"  {entry.msgid!r}" for entry in entries)


def untranslated_or_fuzzy(entries: list[PoEntry]) -> tuple[list[PoEntry], list[PoEntry]]:
    messages = [entry for entry in entries if not entry.is_header]
    untranslated = [entry for entry in messages if not entry.msgstrs or not all(entry.msgstrs)]
    fuzzy = [entry for entry in messages if "fuzzy" in entry.flags]
    return untranslated, fuzzy


def read_mo(path: Path) -> dict[str, str]:
    """Read a compiled GNU .mo catalog into {original: translation}, keys as msgfmt stores them."""
    data = path.read_bytes()
    order = "<" if data[:4] == struct.pack("<I", 0x950412DE) else ">"
    _, count, originals_at, translations_at = struct.unpack(order + "4I", data[4:20])

    def string_at(table: int, index: int) -> str:
        start = table + 8 * index
        length, offset = struct.unpack(order + "2I", data[start : start + 8])
        return data[offset : offset + length].decode("utf-8")

    return {
        string_at(originals_at, index): string_at(translations_at, index) for index in range(count)
    }


def copy_sources(destination: Path) -> None:
    """Copy the files that makemessages reads, plus the catalogs, to `destination`."""
    skipped_dirs = set(MAKEMESSAGES_IGNORE) | {"__pycache__", "node_modules"}

    def ignore(directory: str, names: list[str]) -> list[str]:
        ignored = []
        for name in names:
            path = Path(directory, name)
            if path.is_dir():
                if name in skipped_dirs or name.startswith("."):
                    ignored.append(name)
            elif path.suffix not in SOURCE_SUFFIXES:
                ignored.append(name)
        return ignored

    shutil.copytree(REPO_ROOT, destination, ignore=ignore)


# --- The committed catalog -------------------------------------------------------------------


def test_po_header_declares_language():
    header = next(entry for entry in read_po(PO_PATH) if entry.is_header)

    assert "fuzzy" not in header.flags, "the header entry is marked fuzzy, so msgfmt would skip it"
    assert "Language: zh_Hans\n" in header.msgstrs[0]
    assert "Plural-Forms: nplurals=1; plural=0;\n" in header.msgstrs[0]
    assert "charset=UTF-8" in header.msgstrs[0]


def test_po_fully_translated():
    untranslated, fuzzy = untranslated_or_fuzzy(read_po(PO_PATH))

    assert not untranslated, f"untranslated entries in {PO_PATH}:\n{describe(untranslated)}"
    assert not fuzzy, (
        f"fuzzy entries in {PO_PATH}, so check each one and remove its fuzzy flag:\n"
        f"{describe(fuzzy)}"
    )


def test_po_keeps_placeholders_and_edge_whitespace():
    placeholder = re.compile(r"%\([a-z_]+\)[sd]|%[sd]|\{\{\s*\w+\s*\}\}")

    for entry in read_po(PO_PATH):
        if entry.is_header:
            continue
        for msgstr in entry.msgstrs:
            expected = sorted(placeholder.findall(entry.msgid))
            assert sorted(placeholder.findall(msgstr)) == expected, entry.msgid
            stripped = entry.msgid.strip()
            leading = entry.msgid[: len(entry.msgid) - len(entry.msgid.lstrip())]
            trailing = entry.msgid[len(leading) + len(stripped) :]
            assert msgstr.startswith(leading), entry.msgid
            assert msgstr.endswith(trailing), entry.msgid


@needs_gettext
def test_po_matches_source_strings(tmp_path, settings, monkeypatch):
    """Check that code and templates use exactly the strings that the catalog translates."""
    copy = tmp_path / "repo"
    copy_sources(copy)
    settings.LOCALE_PATHS = [copy / "locale"]
    monkeypatch.chdir(copy)

    call_command(
        "makemessages", locale=["zh_Hans"], ignore_patterns=MAKEMESSAGES_IGNORE, verbosity=0
    )

    regenerated = read_po(copy / "locale" / "zh_Hans" / "LC_MESSAGES" / "django.po")
    untranslated, fuzzy = untranslated_or_fuzzy(regenerated)
    assert not untranslated, (
        f"strings in the source have no translation, so {UPDATE_HINT}:\n{describe(untranslated)}"
    )
    assert not fuzzy, (
        f"strings in the source only have a fuzzy guess, so {UPDATE_HINT}:\n{describe(fuzzy)}"
    )

    committed_keys = {entry.key for entry in read_po(PO_PATH)}
    regenerated_keys = {entry.key for entry in regenerated}
    stale = sorted(msgid for _, msgid, _ in committed_keys - regenerated_keys)
    assert not stale, (
        f"the catalog contains strings that the source no longer uses, so {UPDATE_HINT}: {stale}"
    )


@needs_gettext
def test_mo_matches_po(tmp_path):
    compiled = tmp_path / "django.mo"
    result = subprocess.run(
        ["msgfmt", "--check", "-o", str(compiled), str(PO_PATH)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"msgfmt --check rejected {PO_PATH}:\n{result.stderr}"

    assert MO_PATH.is_file(), f"{MO_PATH} is missing, so {COMPILE_HINT}"
    assert read_mo(MO_PATH) == read_mo(compiled), (
        f"{MO_PATH} is older than {PO_PATH}, so {COMPILE_HINT}"
    )


# --- Translations at run time ----------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("accept_language", ["zh-CN,zh;q=0.9,en;q=0.8", "zh-hans"])
def test_login_page_in_chinese(client, accept_language):
    response = client.get(reverse("login"), HTTP_ACCEPT_LANGUAGE=accept_language)

    content = response.content.decode()
    assert response.status_code == 200
    assert '<html lang="zh-hans">' in content
    assert "<h1>登录</h1>" in content
    assert "Log in" not in content


@pytest.mark.django_db
def test_login_page_in_english(client):
    response = client.get(reverse("login"), HTTP_ACCEPT_LANGUAGE="en")

    content = response.content.decode()
    assert '<html lang="en">' in content
    assert "<h1>Log in</h1>" in content
    assert "登录" not in content


@pytest.mark.django_db
def test_dashboard_in_chinese(client, user, tiny_base_dir):
    client.force_login(user)

    response = client.get(reverse("adapters_app:dashboard"), HTTP_ACCEPT_LANGUAGE="zh-CN")

    content = response.content.decode()
    assert response.status_code == 200
    assert '<html lang="zh-hans">' in content
    assert "<title>仪表盘 · loraweb</title>" in content
    assert "<h2>新建任务</h2>" in content
    assert "还没有任务。" in content
    assert "基座模型：离线构建、权重随机的微型 GPT-2。" in content
    assert "退出登录" in content
    assert "New task" not in content


@pytest.mark.django_db
def test_dashboard_in_english(client, user, tiny_base_dir):
    client.force_login(user)

    response = client.get(reverse("adapters_app:dashboard"), HTTP_ACCEPT_LANGUAGE="en")

    content = response.content.decode()
    assert '<html lang="en">' in content
    assert "<h2>New task</h2>" in content
    assert "Base model: tiny GPT-2 built offline with random weights." in content
    assert "新建任务" not in content


def test_problem_message_in_chinese(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "Say hi"}\n', encoding="utf-8")
    with pytest.raises(DatasetInvalid) as caught:
        parse_dataset(path, "broken.jsonl")
    problem = caught.value.problems[0]
    assert problem.code == "missing_key"

    with override("zh-hans"):
        chinese = problem_message(problem)
    with override("en"):
        english = problem_message(problem)

    assert chinese == '第 1 行：缺少键 "completion"；每行 JSON 都需要 "prompt" 和 "completion"，或者 "text"。'
    assert english == problem.message


@pytest.mark.parametrize("code", sorted(MESSAGE_TEMPLATES))
def test_problem_template_translated(code):
    template = MESSAGE_TEMPLATES[code]

    with override("zh-hans"):
        translated = gettext(template)

    assert translated != template, f"no Chinese translation for the {code} template"
