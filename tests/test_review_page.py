"""Review page round trip in a real headless Chromium (selenium): open the static page from
file://, drop two bags (mouse and keyboard), keep one, reload (progress kept in localStorage),
export, apply the decisions and check the final TrueMatch folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import pytest

from datasets_scripts import review_bags as rb
from datasets_scripts import truematch as tm
from tests.browser import headless_chrome
from tests.tiny import random_images

N_BAGS, SIZE = 5, 3


@pytest.fixture(scope="module")
def truematch_dir(tmp_path_factory) -> Path:
    """A TrueMatch folder with 5 bags of 3 (15 images, image bytes embedded)."""
    root = tmp_path_factory.mktemp("tm")
    n = N_BAGS * SIZE
    ds = datasets.Dataset.from_dict(
        {"cocoid": [1000 + i for i in range(n)], "image": random_images(n, size=48, seed=3),
         "captions": [[f"image {i} caption {k} </script><b>x</b>" for k in range(2)] for i in range(n)]},
        features=datasets.Features({"cocoid": datasets.Value("int64"), "image": datasets.Image(),
                                    "captions": datasets.List(datasets.Value("string"))}))
    bags = [[SIZE * b + j for j in range(SIZE)] for b in range(N_BAGS)]
    alpha = [0.9 - 0.1 * b for b in range(N_BAGS)]
    info = {"judge": "tiny", "dataset": "generated", "split": "test", "n_images": n, "sizes": [SIZE],
            "candidates": {str(SIZE): n}, "curated": {str(SIZE): N_BAGS}, "min_alpha": None, "max_bags": None,
            "review": None}
    tm.write_truematch(root, ds, {SIZE: (bags, alpha)}, info, progress=False)
    return root


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chromium")
    drv = headless_chrome(tmp, prefs={"download.default_directory": str(tmp / "downloads"),
                                      "download.prompt_for_download": False})
    drv.downloads = tmp / "downloads"
    yield drv
    drv.quit()


def wait_for(fn, timeout: float = 10.0):
    end = time.time() + timeout
    while True:
        value = fn()
        if value or time.time() > end:
            return value
        time.sleep(0.05)


def severe_logs(drv) -> list[dict]:
    return [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]


def test_review_round_trip_in_browser(truematch_dir, driver, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    page = rb.write_review_page(truematch_dir, SIZE, tmp_path / "review.html", progress=False)
    driver.get(page.resolve().as_uri())
    assert wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, "section.bag")) == N_BAGS)
    expected_id = rb.page_id(rb.read_bags(truematch_dir, SIZE), SIZE)
    assert driver.execute_script("return window.exportDecisions().page_id") == expected_id
    # captions are shown as text (the '</script>' in them neither breaks the page nor injects HTML)
    first = driver.find_element(By.ID, "bag-0")
    assert "image 0 caption 1 </script><b>x</b>" in first.text
    assert not first.find_elements(By.TAG_NAME, "b")
    assert all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 48
               for img in first.find_elements(By.TAG_NAME, "img"))

    # drop bag 1 with the mouse, then move two bags down and drop bag 3 with the keyboard
    driver.find_element(By.CSS_SELECTOR, "#bag-1 button[data-action=drop]").click()
    ActionChains(driver).send_keys("j").send_keys("j").send_keys("d").perform()
    ActionChains(driver).send_keys("k").perform()  # "d" advanced to bag 4: keep it
    progress = driver.find_element(By.ID, "progress")
    assert wait_for(lambda: progress.text == "3/5 decided · 1 kept · 2 dropped"), progress.text

    # reload: the decisions survive in localStorage
    driver.refresh()
    assert wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, "section.bag")) == N_BAGS)
    state = driver.execute_script("return window.reviewState()")
    assert state["decisions"] == {"1": "drop", "3": "drop", "4": "keep"}
    assert "drop" in driver.find_element(By.ID, "bag-3").get_attribute("class").split()
    assert driver.find_element(By.ID, "progress").text == "3/5 decided · 1 kept · 2 dropped"

    # export: a download and the visible text box hold the same decisions
    driver.find_element(By.ID, "export-btn").click()
    exported = json.loads(driver.find_element(By.ID, "export").get_attribute("value"))
    assert exported["decisions"] == {"1": "drop", "3": "drop", "4": "keep"}
    assert exported["page_id"] == expected_id and exported["bag_size"] == SIZE
    downloaded = driver.downloads / "review_bags_3.json"
    assert wait_for(downloaded.exists), list(driver.downloads.glob("*"))
    assert json.loads(wait_for(downloaded.read_text))["decisions"] == exported["decisions"]
    assert severe_logs(driver) == []

    # apply: undecided bags (0, 2) are kept by default
    final = tmp_path / "final"
    summary = rb.apply_review(truematch_dir, downloaded, final)
    assert summary == {"3": {"n_before": 5, "kept": 3, "dropped": 2, "undecided": 2, "undecided_policy": "keep"}}
    loaded = datasets.load_dataset(str(final), "bags_3", cache_dir=str(tmp_path / "cache"))["test"]
    assert loaded["bag_id"] == [0, 2, 4]
    assert loaded["cocoids"] == [[1000, 1001, 1002], [1006, 1007, 1008], [1012, 1013, 1014]]
    assert loaded["alpha"] == pytest.approx([0.9, 0.7, 0.5])
    assert loaded[1]["images"][0].size == (48, 48)
    assert json.loads((final / "3.json").read_text()) == loaded["cocoids"]
    assert json.loads((final / "alpha_3.json").read_text()) == pytest.approx([0.9, 0.7, 0.5])
    assert (final / "review" / "decisions_bags_3.json").exists()
    card = (final / "README.md").read_text()
    assert "| bags_3 | 3 | 15 | 5 | 3 (dropped 2, undecided 2: keep) |" in card

    # the other policies for undecided bags
    rb.apply_review(truematch_dir, downloaded, final, undecided="drop", overwrite=True)
    assert json.loads((final / "3.json").read_text()) == [[1012, 1013, 1014]]
    with pytest.raises(ValueError, match="2 of 5 bags of bags_3 are undecided"):
        rb.apply_review(truematch_dir, downloaded, tmp_path / "final2", undecided="error")


def test_linked_images_page_works_offline(truematch_dir, driver, tmp_path):
    from selenium.webdriver.common.by import By

    assert rb.main([str(truematch_dir), "--size", "3", "--out", str(tmp_path / "p.html"), "--link-images",
                    "--thumb-size", "32"]) == 0
    assert len(list((tmp_path / "p_files").glob("*.jpg"))) == N_BAGS * SIZE
    driver.get((tmp_path / "p.html").as_uri())
    imgs = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#bag-4 img"))
    assert imgs[0].get_attribute("src").endswith("p_files/1012.jpg")
    assert wait_for(lambda: all(driver.execute_script("return arguments[0].naturalWidth", i) == 32 for i in imgs))
    # a fresh page id: no progress from the other page leaks in (same bags -> same id -> same progress)
    assert driver.execute_script("return window.exportDecisions().page_id") == rb.page_id(
        rb.read_bags(truematch_dir, SIZE), SIZE)
    assert severe_logs(driver) == []


def test_apply_review_rejects_bad_decisions(truematch_dir, tmp_path):
    table = rb.read_bags(truematch_dir, SIZE)
    good = {"format": rb.FORMAT, "page_id": rb.page_id(table, SIZE), "config": "bags_3", "bag_size": 3,
            "decisions": {"0": "drop"}}
    with pytest.raises(ValueError, match="another version"):
        rb.apply_review(truematch_dir, {**good, "page_id": "truematch-bags_3-0000"}, tmp_path / "a")
    with pytest.raises(ValueError, match=r"unknown bag ids \['9'\]"):
        rb.apply_review(truematch_dir, {**good, "decisions": {"9": "drop"}}, tmp_path / "b")
    with pytest.raises(ValueError, match="'keep' or 'drop'"):
        rb.apply_review(truematch_dir, {**good, "decisions": {"0": "maybe"}}, tmp_path / "c")
    with pytest.raises(ValueError, match="must differ"):
        rb.apply_review(truematch_dir, good, truematch_dir)
    assert rb.main(["apply", str(truematch_dir), "--decisions", str(tmp_path / "nope.json"), "--out",
                    str(tmp_path / "d")]) != 0
    path = tmp_path / "good.json"
    path.write_text(json.dumps(good))
    assert rb.main(["apply", str(truematch_dir), "--decisions", str(path), "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "3.json").read_text())[0] == [1003, 1004, 1005]
