"""The daily flows in headless Chromium against uvicorn and a real Celery worker.

The tests run in file order and build on each other: the dataset uploaded first trains the
versions that the playground and the admin rollback then use. Each saves the screenshots
that docs/user-guide.md shows.
"""

from __future__ import annotations

import pytest

from training_app import demo_data

from .conftest import LAPTOP, PHONE, log_in, screenshot

pytestmark = [pytest.mark.integration, pytest.mark.browser]

SLUG = "spell-digits"
TRAINING_TIMEOUT_MS = 240_000

# What the earlier flows leave for the later ones.
state: dict[str, object] = {}


def needs(key: str) -> object:
    if key not in state:
        pytest.skip(f"needs the result of an earlier flow in this module ({key})")
    return state[key]


@pytest.fixture(scope="module")
def dataset_files(tmp_path_factory):
    return demo_data.write_demo_datasets(tmp_path_factory.mktemp("e2e-datasets"))


def create_task(page, slug: str, name: str) -> None:
    page.fill("#task-form input[name=slug]", slug)
    page.fill("#task-form input[name=name]", name)
    page.click("#task-form button[type=submit]")
    page.wait_for_url(f"**/tasks/{slug}/")


def upload_dataset(page, path) -> None:
    page.set_input_files("#upload-form input[type=file]", str(path))
    page.click("#upload-form button[type=submit]")
    page.wait_for_url("**/training/datasets/*/")


def train_version(page, start: str) -> None:
    """Fill "train new version" with quick settings and wait on the job page until it succeeds."""
    page.click("#train-button")
    page.wait_for_url("**/train")
    assert page.is_checked("#train-form input[name=datasets]"), "the newest dataset is chosen by default"
    page.check(f"#train-form input[name=start][value={start}]")
    page.select_option("#train-form select[name=preset]", "quick")
    page.click("#hyperparameters summary")
    assert page.get_attribute("#train-form input[name=rank]", "placeholder") == "4", "placeholders follow the preset"
    page.fill("#train-form input[name=learning_rate]", "0.005")
    page.fill("#train-form input[name=batch_size]", "16")
    page.fill("#train-form input[name=max_steps]", "8")
    page.fill("#train-form input[name=max_length]", "48")
    page.click("#start-training")
    page.wait_for_url("**/training/jobs/*/")

    # The page polls the job and reloads itself once the job is final.
    page.wait_for_selector("#job-state[data-state=succeeded], #job-state[data-state=failed]", timeout=TRAINING_TIMEOUT_MS)
    assert page.get_attribute("#job-state", "data-state") == "succeeded", page.inner_text("#job-error")
    assert page.get_attribute("#job-progress", "style").replace(" ", "") == "width:100%"
    assert page.is_visible("#job-done")


def assert_fits_phone(page) -> None:
    """Reload the page at phone width and check that nothing makes it wider than the screen."""
    page.set_viewport_size(PHONE)
    page.reload()
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    page.set_viewport_size(LAPTOP)
    assert overflow <= 0, f"{page.url} is {overflow} px wider than a {PHONE['width']} px phone screen"


def watch_answers(page) -> None:
    """Record every text piece that the streaming script appends to an answer, in order."""
    page.evaluate(
        """() => {
            window.answerPieces = [];
            new MutationObserver((records) => {
                for (const record of records) {
                    const pre = record.target.closest && record.target.closest("pre.answer");
                    if (!pre) continue;
                    const column = [...document.querySelectorAll("#answer-list pre.answer")].indexOf(pre);
                    window.answerPieces.push([column, pre.textContent]);
                }
            }).observe(document.getElementById("answer-list"), {childList: true, subtree: true, characterData: true});
        }"""
    )


def served_by(page, count: int) -> list[str]:
    """Wait for `count` answer columns to finish and return what each says served it."""
    page.wait_for_function(
        """(count) => {
            const columns = document.querySelectorAll("#answer-list .answer-column");
            return columns.length === count && [...columns].every((column) => column.querySelector("dl dd"));
        }""",
        arg=count,
        timeout=120_000,
    )
    return page.eval_on_selector_all("#answer-list .answer-column dl dd:first-of-type", "nodes => nodes.map(n => n.textContent)")


def test_upload_dataset_statistics(new_page, superuser, server_url, dataset_files):
    page = new_page()
    page.goto("/")
    page.wait_for_url("**/accounts/login/?next=/")
    log_in(page, superuser.username)

    assert page.is_visible("#empty-state")
    assert "tiny GPT-2" in page.inner_text("#base-model-note")
    screenshot(page, "01-dashboard-empty.png")

    create_task(page, SLUG, "Spell digits")
    upload_dataset(page, dataset_files["spell_digits_A1"])

    assert page.inner_text("h1") == "spell_digits_A1.jsonl"
    assert page.inner_text("#num-examples") == "300"
    assert page.inner_text("#split-sizes") == "270 / 30"
    assert int(page.inner_text("#token-max")) > 0
    assert page.locator("#length-histogram svg").count() == 1
    assert page.locator("#preview tbody tr").count() > 0
    screenshot(page, "02-dataset-statistics.png")
    assert_fits_phone(page)
    state["dataset"] = page.url


def test_train_new_version(new_page, superuser, e2e_worker):
    needs("dataset")
    page = new_page()
    log_in(page, superuser.username)
    page.goto(f"/tasks/{SLUG}/")

    train_version(page, "fresh")
    screenshot(page, "03-training-job.png")
    assert_fits_phone(page)

    page.click("#job-done a")
    page.wait_for_url(f"**/tasks/{SLUG}/")
    assert "active" in page.inner_text("#version-1")
    assert "v1" in page.inner_text("#activation-table")

    # A second version, warm-started from the first, for the playground and the rollback.
    train_version(page, "active")
    page.goto(f"/tasks/{SLUG}/")
    if "active" not in page.inner_text("#version-2"):
        # The promotion rule kept v2 as a candidate; activate it by hand, with a reason.
        page.fill("#version-2 input[name=reason]", "more training")
        page.click("#version-2 form button[type=submit]")
        page.wait_for_url(f"**/tasks/{SLUG}/")
    assert "active" in page.inner_text("#version-2")
    assert "v1" in page.inner_text("#version-2 td:nth-child(3)"), "v2 names its parent"
    screenshot(page, "04-task-versions.png")
    assert_fits_phone(page)

    page.goto("/")
    row = page.inner_text(f"#task-{SLUG}")
    assert "v2" in row
    assert "succeeded" in row
    screenshot(page, "05-dashboard.png")
    assert_fits_phone(page)
    page.set_viewport_size(PHONE)
    screenshot(page, "05-dashboard-phone.png")
    state["versions"] = ("v1", "v2")


def test_playground_streams_and_compares(new_page, superuser):
    needs("versions")
    page = new_page()
    log_in(page, superuser.username)
    page.click(f"#task-table a[href$='playground/?task={SLUG}']")
    page.wait_for_url(f"**/playground/?task={SLUG}")

    page.fill("#playground-form textarea[name=prompt]", "407")
    page.fill("#playground-form input[name=max_tokens]", "48")
    page.click("#playground-form button[type=submit]")
    assert served_by(page, 1) == [f"{SLUG} v2"]

    # Side by side: both versions and the bare base, whose random weights rarely stop early,
    # so its column receives many token events.
    for value in ("base", "1", "2"):
        page.check(f"#playground-form input[name=compare][value='{value}']")
    watch_answers(page)
    page.click("#playground-form button[type=submit]")
    assert served_by(page, 3) == [f"{SLUG}, bare base (no adapter)", f"{SLUG} v1", f"{SLUG} v2"]

    final_text = page.inner_text("#answer-list .answer-column:nth-child(1) pre.answer")
    base_pieces = [text for column, text in page.evaluate("window.answerPieces") if column == 0]
    growing = [text for text in base_pieces if text and final_text.startswith(text)]
    assert len(set(growing)) >= 3, f"the base answer arrived in {len(set(growing))} pieces: {base_pieces!r}"
    assert all(len(a) < len(b) for a, b in zip(growing, growing[1:]) if a != b), "the answer shrank while streaming"
    screenshot(page, "06-playground-compare.png")
    assert_fits_phone(page)


def test_admin_rollback(new_page, superuser):
    needs("versions")
    from adapters_app.models import ActivationEvent

    page = new_page()
    log_in(page, superuser.username)
    page.goto("/admin/adapters_app/adapterversion/")
    v1_link = page.get_by_role("link", name=f"{SLUG}@v1", exact=True)
    page.locator("#result_list tbody tr", has=v1_link).locator("input.action-select").check()
    page.select_option("select[name=action]", "rollback_to_version")
    page.click("button[name=index]")
    page.fill("textarea[name=reason]", "v2 answers worse on long numbers")
    screenshot(page, "07-admin-rollback.png")
    page.click("input[type=submit][value='Roll back']")
    assert "v1" in page.inner_text("ul.messagelist")

    event = ActivationEvent.objects.filter(task__slug=SLUG).first()
    assert event.kind == "rollback"
    assert event.to_version.label == "v1"
    assert event.actor.username == superuser.username

    page.goto(f"/playground/?task={SLUG}")
    page.fill("#playground-form textarea[name=prompt]", "407")
    page.click("#playground-form button[type=submit]")
    assert served_by(page, 1) == [f"{SLUG} v1"]

    page.goto(f"/tasks/{SLUG}/")
    newest = page.inner_text("#activation-table tbody tr:first-child")
    assert "v2 → v1" in newest
    assert "v2 answers worse on long numbers" in newest
    screenshot(page, "08-activation-history.png")

    page.goto("/admin/adapters_app/activationevent/")
    assert "v2 answers worse on long numbers" in page.inner_text("#result_list")


def test_chinese_upload_flow(new_page, superuser, dataset_files):
    page = new_page(locale="zh-CN")
    page.goto("/accounts/login/")
    assert page.inner_text("h1") == "登录"
    log_in(page, superuser.username)
    assert page.inner_text("main h1") == "任务"
    assert "新建任务" in page.inner_text("main")
    assert "仪表盘" in page.inner_text("header")

    create_task(page, "reverse-words", "倒序单词")
    assert "任务 reverse-words 已创建" in page.inner_text("ul.messages")
    assert "上传并校验" in page.inner_text("#upload-form")
    assert "训练新版本" in page.inner_text("#train-button")
    upload_dataset(page, dataset_files["reverse_words_B1"])

    assert "数据集 reverse_words_B1.csv 已保存，共 300 个样本。" in page.inner_text("ul.messages")
    stats = page.inner_text("#dataset-stats")
    assert "样本数" in stats
    assert "训练集 / 验证集" in stats
    assert page.inner_text("#num-examples") == "300"
    state["zh_dataset"] = page.url
    screenshot(page, "09-dataset-statistics-zh.png")
    page.goto("/")
    assert "生效版本" in page.inner_text("#task-table thead")
    screenshot(page, "10-dashboard-zh.png")

    # The language switcher overrides the browser's language, both ways.
    english = new_page(locale="en-US")
    log_in(english, superuser.username)
    assert english.inner_text("main h1") == "Tasks"
    with english.expect_navigation():
        english.select_option("#language-select", "zh-hans")
    assert english.inner_text("main h1") == "任务"
    english.goto(state["zh_dataset"])
    assert "样本数" in english.inner_text("#dataset-stats")
    with english.expect_navigation():
        english.select_option("#language-select", "en")
    assert "Examples" in english.inner_text("#dataset-stats")
