"""The FID leaderboard: the smoke suite end to end, suite validation, and the GPU workflow file."""
import importlib
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from genflow.errors import ConfigError, RegressionFound
from genflow.apps.leaderboard import COLUMNS, entry_overrides, load_suite, resolve_steps, run, suites
from genflow.results.gate import compare, pooled_std
from genflow.results.history import append_records, last_matching, read_history

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "fid-leaderboard.yml"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke suite run once into ``lb`` with its history: (folder, history file, result, stdout)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("smoke")
    mp = pytest.MonkeyPatch()
    mp.setenv("GENFLOW_METRICS_HOME", str(root / "metrics"))
    mp.chdir(root)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            result = run(["suite=smoke", f"out={root / 'lb'}", f"history={root / 'history.jsonl'}"])
    finally:
        mp.undo()
    return root / "lb", root / "history.jsonl", result, printed.getvalue()


@pytest.mark.slow
def test_smoke_suite_writes_a_well_formed_table(smoke):
    out, history, result, printed = smoke
    assert json.loads(printed.strip().splitlines()[-1]) == result
    table = json.loads((out / "leaderboard.json").read_text())
    suite = load_suite("smoke")
    assert table["suite"] == "smoke" and len(table["rows"]) == len(suite["entries"]) == 3
    assert [r["name"] for r in table["rows"]] == ["edm-nfe7", "edm-nfe15", "pfgmpp-D128"]
    for row, entry in zip(table["rows"], suite["entries"]):
        assert {k for k, _ in COLUMNS} <= set(row)
        assert row["name"] == entry["name"] and row["dataset"] == "digits" and row["images"] == 200
        assert row["train_steps"] == entry["budget"]["steps"] and row["fid_sets"] == [row["fid"]]
        # a briefly trained model: finite, positive, and below noise-level digits-FID at NFE 15
        assert math.isfinite(row["fid"]) and row["fid"] > 0
        assert row["img_per_s"] > 0 and row["wall_s"] > 0 and row["commit"] and row["device"]
        assert Path(row["checkpoint"]).is_absolute() and (out / row["grid"]).is_file()
        # the suite asks for KID and improved precision/recall next to FID
        assert math.isfinite(row["kid"]) and 0 <= row["pr_precision"] <= 1 and 0 <= row["pr_recall"] <= 1
    assert [r["nfe"] for r in table["rows"]] == [7, 15, 15]
    assert all(r["fid"] < 100 for r in table["rows"][1:])
    # the sweep's two rows evaluate one trained model (one run folder)
    assert table["rows"][0]["checkpoint"] == table["rows"][1]["checkpoint"]
    assert [r["settings"] for r in table["rows"]] == ["inf", "inf", 128]
    assert [r["model"] for r in table["rows"]] == ["edm", "edm", "pfgmpp"]
    md = (out / "leaderboard.md").read_text().splitlines()
    header = next(i for i, line in enumerate(md) if line.startswith("| entry"))
    assert md[header] == "| " + " | ".join(h for _, h in COLUMNS) + " |"
    body = [line for line in md[header + 2:] if line.startswith("|")]
    assert len(body) == len(suite["entries"])
    assert all(line.count("|") == len(COLUMNS) + 1 for line in body)
    # the header names the suite's file and the FID settings the rows used (num and precision as given)
    assert "configs/leaderboard/suite/smoke.yaml`" in md[2] and '"precision": "fp32"' in md[2]
    assert json.loads(md[2].split("FID settings: `")[1].rstrip("`.")) == {**suite["fid"], "precision": "fp32"}
    # one history record per entry, in the documented schema
    records = read_history(history)
    assert [r["entry"] for r in records] == [r["name"] for r in table["rows"]]
    for record, row in zip(records, table["rows"]):
        assert record["suite"] == "smoke" and record["fid"] == row["fid"] and record["fid_sets"] == row["fid_sets"]
        assert record["commit"] == row["commit"] and record["date"] == row["date"] and record["nfe"] == row["nfe"]


@pytest.mark.slow
def test_history_grows_by_appending_and_the_gate_fails_a_worse_run(smoke, tmp_path, monkeypatch):
    """A second run into the same folder continues (the finished trainings are reused) and appends; a third
    run whose PFGM++ entry trains 2 steps instead of 80 fails the gate naming the entry and both FIDs."""
    out, history, first, _ = smoke
    monkeypatch.setenv("GENFLOW_METRICS_HOME", str(out.parent / "metrics"))
    monkeypatch.chdir(tmp_path)
    before = history.read_bytes()
    second = run(["suite=smoke", f"out={out}", f"history={history}"])
    assert second["fid"] == first["fid"] and second["regressions"] == []  # same checkpoints, same seeds
    after = history.read_bytes()
    assert after.startswith(before) and len(read_history(history)) == 6  # appended, never rewritten
    # a changed entry cannot continue the run trained for the old one: refused before any work, saying how
    with pytest.raises(ConfigError, match="out=ANOTHER_DIR") as refused:
        run(["suite=smoke", "suite.entries.1.D=64", f"out={out}", f"history={history}"])
    assert "pfgmpp-D128" in str(refused.value) and history.read_bytes() == after
    with pytest.raises(RegressionFound) as err:
        run(["suite=smoke", "only=pfgmpp-D128", "suite.entries.1.budget.steps=2", f"out={tmp_path / 'worse'}",
             f"history={history}"])
    worse = read_history(history)[-1]
    assert worse["entry"] == "pfgmpp-D128" and worse["train_steps"] == 2
    message = str(err.value)
    assert "pfgmpp-D128" in message and f"{worse['fid_mean']:.4f}" in message
    assert f"{first['fid']['pfgmpp-D128']:.4f}" in message and "fix:" in message
    assert (tmp_path / "worse" / "index.html").is_file()  # the page and history are written before failing


def test_the_gate_passes_noise_and_fails_an_injected_regression():
    """Three seed sets per run: a rerun within the seeds' spread passes, the same sets shifted by more than
    k pooled standard deviations fail; with one set the tolerance alone decides."""
    base = {"entry": "e", "commit": "abc", "date": "d", "fid_sets": [10.0, 10.4, 9.8]}
    base["fid_mean"] = sum(base["fid_sets"]) / 3
    noise = {"entry": "e", "fid_sets": [10.3, 9.9, 10.5]}
    noise["fid_mean"] = sum(noise["fid_sets"]) / 3
    s = pooled_std(base["fid_sets"], noise["fid_sets"])
    var = lambda v: sum((x - sum(v) / 3) ** 2 for x in v) / 2  # noqa: E731
    assert s == pytest.approx(math.sqrt((var(base["fid_sets"]) + var(noise["fid_sets"])) / 2), rel=1e-12)
    assert not compare(base, noise, k=3, tolerance=0.0).regressed
    shift = 3 * s + 0.01
    worse = {"entry": "e", "fid_sets": [v + shift for v in base["fid_sets"]]}
    worse["fid_mean"] = base["fid_mean"] + shift
    verdict = compare(base, worse, k=3, tolerance=0.0)
    assert verdict.regressed and verdict.allowed == pytest.approx(3 * pooled_std(base["fid_sets"], worse["fid_sets"]))
    assert f"{worse['fid_mean']:.4f}" in verdict.describe() and f"{base['fid_mean']:.4f}" in verdict.describe()
    assert not compare(base, worse, k=3, tolerance=shift + 0.01).regressed  # the tolerance floor
    one = {"entry": "e", "commit": "abc", "date": "d", "fid_sets": [10.0], "fid_mean": 10.0}
    assert pooled_std([10.0], [10.5]) == 0.0
    assert not compare(one, {**one, "fid_sets": [10.5], "fid_mean": 10.5}, tolerance=0.6).regressed
    assert compare(one, {**one, "fid_sets": [10.7], "fid_mean": 10.7}, tolerance=0.6).regressed
    # better is never a regression
    assert not compare(base, {**base, "fid_mean": 1.0}, k=0, tolerance=0).regressed


def _record(**kw):
    record = {"schema": 1, "suite": "s", "entry": "e", "commit": "c", "date": "2026-01-01T00:00:00+00:00",
              "device": "cpu", "precision": "fp32", "solver": "heun", "nfe": 35, "images": 100, "seed_sets": 1,
              "fid_sets": [5.0], "fid": 5.0, "fid_mean": 5.0, "wall_s": 1.0}
    return {**record, **kw}


def test_history_is_appended_atomically_and_checked_on_read(tmp_path):
    path = tmp_path / "h" / "history.jsonl"
    append_records(path, [_record(), _record(entry="f")])
    append_records(path, [_record(fid=6.0)])
    assert [r["entry"] for r in read_history(path)] == ["e", "f", "e"]
    assert last_matching(read_history(path), _record())["fid"] == 6.0
    assert last_matching(read_history(path), _record(nfe=7)) is None  # other settings are not compared
    # a write cut off by a crash: the torn line is skipped on read, the next append starts after it
    with open(path, "a") as f:
        f.write('{"schema": 1, "su')
    assert len(read_history(path)) == 3
    append_records(path, [_record(entry="g")])
    assert [r["entry"] for r in read_history(path)] == ["e", "f", "e", "g"]
    assert path.read_text().count("\n") == 5
    # a broken line inside the file is an error naming it; plain keys only
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_record()) + "\n" + json.dumps(_record(fid="x")) + "\n")
    with pytest.raises(ConfigError, match="line 2.*fid"):
        read_history(bad)
    with pytest.raises(ValueError, match="bpd_sigma0=0.05"):
        append_records(path, [_record(**{"bpd_sigma0=0.05": 1.0})])


def test_the_table_header_states_the_settings_given():
    from genflow.apps.leaderboard import markdown

    suite = load_suite("smoke")
    header = markdown(suite, [], num=100, precision="bf16").splitlines()[2]
    assert json.loads(header.split("FID settings: `")[1].rstrip("`.")) == {**suite["fid"], "num": 100,
                                                                           "precision": "bf16"}


@pytest.mark.parametrize("name", suites())
def test_every_suite_entry_composes(name, tmp_path):
    from genflow.config import build_method, compose

    suite = load_suite(name)
    for entry in suite["entries"]:
        if entry.get("ckpt") or "pickle" in entry:  # loaded, not trained (pickle: tests/test_convert.py)
            continue
        cfg = compose(entry_overrides(entry, suite, tmp_path / entry["name"]), environment=False)
        assert cfg.trainer.max_steps == entry["budget"]["steps"]
        method = build_method(cfg)
        steps = resolve_steps(method, entry, "heun")
        if entry.get("nfe"):
            assert method.nfe(steps, "heun") == entry["nfe"]
    if name == "cifar10":  # the paper protocol: 35 NFE = 18 Heun steps, 3 x 50k seeds, TF-Inception
        assert resolve_steps(build_method(cfg), suite["entries"][0], "heun") == 18
        assert suite["fid"]["mode"] == "legacy_tensorflow" and suite["fid"]["seed_sets"] == 3


def test_bad_suites_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="smoke"):
        load_suite("no-such-suite")
    bad = tmp_path / "bad.yaml"
    bad.write_text("entries:\n  - {method: edm, dataset: digits, learning_rate: 1}\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_suite(str(bad))
    from genflow.methods import EDM

    with pytest.raises(ConfigError, match="NFE 36"):
        resolve_steps(EDM(), {"name": "x", "nfe": 36}, "heun")
    with pytest.raises(ConfigError, match="bogus"):
        run(["suite=smoke", "bogus=1"])


def test_workflow_parses_and_calls_existing_commands():
    wf = yaml.safe_load(WORKFLOW.read_text())
    triggers = wf.get("on", wf.get(True))  # YAML 1.1 reads the bare key `on` as a boolean
    assert "workflow_dispatch" in triggers
    job = wf["jobs"]["leaderboard"]
    assert "self-hosted" in job["runs-on"] and "gpu" in job["runs-on"]
    default_suite = triggers["workflow_dispatch"]["inputs"]["suite"]["default"]
    assert default_suite in suites()
    runs = "\n".join(step.get("run", "") for step in job["steps"])
    # every `python -m module` exists, every make target exists, imported names exist
    modules = re.findall(r"python -m ([\w.]+)", runs)
    assert "genflow.apps.leaderboard" in modules
    for mod in modules:
        assert importlib.util.find_spec(mod) is not None, mod
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"\bmake (\w+)", runs):
        assert re.search(rf"^{target}:", makefile, re.M), target
    for mod, name in re.findall(r"from ([\w.]+) import (\w+)", runs):
        assert hasattr(importlib.import_module(mod), name)
    uploads = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    for path in ("leaderboard.md", "index.html", "grids/"):
        assert f"leaderboard/${{{{ env.SUITE }}}}/{path}" in uploads["with"]["path"]
    assert "out=leaderboard/$SUITE history=leaderboard/history.jsonl" in runs
    # a crash or a regression fails the job: bash with pipefail wherever output is piped
    assert wf["defaults"]["run"]["shell"] == "bash"
    suite_step = next(s for s in job["steps"] if s.get("name") == "Run the suite")
    assert "set -o pipefail" in suite_step["run"] and "| tee" in suite_step["run"]
    # the history is restored before the suite and saved after it, even when the suite failed
    names = [s.get("name") for s in job["steps"]]
    assert names.index("Restore the history") < names.index("Run the suite") < names.index("Save the history")
    save = job["steps"][names.index("Save the history")]
    assert save["if"] == "always()" and "git push origin" in save["run"] and "cmp -n" in save["run"]
    assert wf["permissions"]["contents"] == "write"


@pytest.mark.slow
def test_leaderboard_hydra_app_trains_into_its_out_folder(tmp_path, monkeypatch, cli):
    """Through the command line (a Hydra app): a 2-step entry trains under out=, not in the working folder,
    and the last line is the leaderboard's JSON line with the precision."""
    monkeypatch.setenv("GENFLOW_METRICS_HOME", str(tmp_path / "metrics"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, err = cli("genflow.apps.leaderboard", "suite=smoke", "only=edm", "num=20",
                         "suite.entries.0.budget.steps=2", f"out={tmp_path / 'lb'}")
    assert code == 0, err[-2000:]
    last = json.loads(out.strip().splitlines()[-1])
    # only=edm names the NFE sweep: both of its rows, from one training run
    assert last["entries"] == 2 and last["precision"] == "fp32" and math.isfinite(last["fid"]["edm-nfe15"])
    assert (tmp_path / "lb" / "runs" / "edm" / "checkpoints" / "final.ckpt").is_file()
    # the working folder holds only the default history, leaderboard/history.jsonl
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == ["leaderboard", "leaderboard/history.jsonl"]
    assert len(read_history(work / "leaderboard" / "history.jsonl")) == 2


def chromium():
    """Headless Chromium from the system's packages driven by Selenium (``.ci/run`` installs both); no
    network, no first-run work, a fresh profile."""
    import shutil
    import tempfile

    webdriver = pytest.importorskip("selenium.webdriver", reason="Selenium is not installed (pip install selenium; "
                                    ".ci/run installs it)")
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("no system Chromium/chromedriver (apt-get install chromium chromium-driver; .ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1300,1000",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='genflow-chromium-')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))


@pytest.mark.slow
def test_the_page_works_in_a_real_browser(smoke):
    from selenium.webdriver.common.by import By

    out, _, _, _ = smoke
    rows = json.loads((out / "leaderboard.json").read_text())["rows"]
    page = (out / "index.html").read_text()
    # self-contained: nothing to fetch (the only URL is the SVG namespace, an identifier)
    assert not [u for u in re.findall(r"https?://[^\s\"'<>]+", page) if u != "http://www.w3.org/2000/svg"]
    browser = chromium()
    try:
        browser.get((out / "index.html").as_uri())
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert not errors, errors
        # every resource the page loaded is a file beside it, and every image decoded
        resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert all(r.startswith("file://") for r in resources)
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        assert sorted(src for src, _, _ in images) == sorted(r["grid"] for r in rows)
        assert all(done and width > 0 for _, done, width in images), images

        def table():
            return [[c.text for c in tr.find_elements(By.TAG_NAME, "td")]
                    for tr in browser.find_elements(By.CSS_SELECTOR, "table.board tbody tr")]

        headers = [th.text.rstrip(" ↕↑↓") for th in browser.find_elements(By.CSS_SELECTOR, "table.board th")]
        name, fid, nfe = headers.index("entry"), headers.index("FID ± std"), headers.index("NFE")
        assert {"KID", "P (k-NN)", "R (k-NN)", "solver", "precision", "commit"} <= set(headers)
        assert "Δ paper" not in headers  # no entry of the smoke suite has a paper figure
        recall = headers.index("R (k-NN)")
        shown = table()
        assert [r[name] for r in shown] == [r["name"] for r in rows]
        assert [float(r[fid].split(" ")[0]) for r in shown] == [round(r["fid"], 3) for r in rows]
        assert [int(r[nfe]) for r in shown] == [r["nfe"] for r in rows]
        assert [float(r[recall]) for r in shown] == [round(r["pr_recall"], 3) for r in rows]
        # sorting by FID reorders the rows, ascending then descending
        th = browser.find_elements(By.CSS_SELECTOR, "table.board th")[fid]
        th.click()
        assert [r[name] for r in table()] == [r["name"] for r in sorted(rows, key=lambda r: r["fid"])]
        th.click()
        assert [r[name] for r in table()] == [r["name"] for r in sorted(rows, key=lambda r: -r["fid"])]
        assert th.get_attribute("aria-sort") == "descending"
        # the NFE sweep's curve and each entry's FID over time are drawn
        headings = [h.text for h in browser.find_elements(By.TAG_NAME, "h2")]
        assert "FID vs NFE" in headings and "FID over time" in headings
        assert len(browser.find_elements(By.CSS_SELECTOR, "svg polyline")) == 1 + len(rows)
        assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        browser.quit()
