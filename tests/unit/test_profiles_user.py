"""Measured profiles: `melange profiles import`, user profiles in list/show, and `compare`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from melange.tools import profiles

MELANGE = shutil.which("melange", path=str(Path(sys.executable).parent)) or "melange"
SHIPPED_L4 = "llama-3.1-8b/l4/tpot-120ms"
SHIPPED_H100 = "llama-3.1-8b/h100/tpot-120ms"


def run(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in {"MELANGE_PROFILES_DIR"}}
    return subprocess.run(
        [MELANGE, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**environ, **(env or {})},
    )


def measured(**changes: Any) -> dict[str, Any]:
    """A measured L4 profile on two-by-two buckets."""
    document: dict[str, Any] = {
        "profile": "llama-3.1-8b/l4/tpot-50ms-lab",
        "name": "L4",
        "costPerHour": 0.72,
        "model": "llama-3.1-8b",
        "tpotSeconds": 0.05,
        "buckets": {"inputTokens": [1, 500, 4000], "outputTokens": [1, 200, 2000]},
        "source": "measured",
        "throughput": [[40.0, 4.0], [5.0, 0.0]],
        "measurement": {"tool": "vllm bench serve", "date": "2025-03-02", "requestsPerBucket": 500},
    }
    document.update(changes)
    return document


def write(tmp_path: Path, document: Any, name: str = "profile.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def test_import_then_list_and_show(tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = run("profiles", "import", str(write(tmp_path, measured())), "--dir", str(store))
    assert result.returncode == 0, result.stderr
    target = store / "llama-3.1-8b__l4__tpot-50ms-lab.yaml"
    assert result.stdout == f"imported llama-3.1-8b/l4/tpot-50ms-lab -> {target}\n"
    assert yaml.safe_load(target.read_text()) == measured()

    listed = run("profiles", "list", "--dir", str(store))
    assert listed.returncode == 0, listed.stderr
    table = listed.stdout.split("\n\n")[0].splitlines()  # then the profiles not shipped
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["llama-3.1-8b/l4/tpot-50ms-lab"][-1] == "measured"
    assert rows[SHIPPED_L4][-1] == "estimate"  # the shipped ones are still there
    assert len(rows) == len(profiles.list_profiles()) + 1  # the shipped ones and the import

    shown = run(
        "profiles", "show", "llama-3.1-8b/l4/tpot-50ms-lab", "--dir", str(store), "-o", "json"
    )
    assert json.loads(shown.stdout) == measured()
    entry = run(
        "profiles", "show", "llama-3.1-8b/l4/tpot-50ms-lab", "--entry-only", "--dir", str(store)
    )
    assert yaml.safe_load(entry.stdout) == {
        "name": "L4",
        "costPerHour": 0.72,
        "throughput": [[40.0, 4.0], [5.0, 0.0]],
    }


def test_default_directory_follows_xdg_and_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, measured())
    result = run("profiles", "import", str(path), env={"XDG_DATA_HOME": str(tmp_path / "data")})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data/melange/profiles/llama-3.1-8b__l4__tpot-50ms-lab.yaml").is_file()
    listed = run("profiles", "list", env={"XDG_DATA_HOME": str(tmp_path / "data")})
    assert "llama-3.1-8b/l4/tpot-50ms-lab" in listed.stdout

    env = {"MELANGE_PROFILES_DIR": str(tmp_path / "mine")}
    assert run("profiles", "import", str(path), env=env).returncode == 0
    assert (
        "tpot-50ms-lab" in run("profiles", "show", "llama-3.1-8b/l4/tpot-50ms-lab", env=env).stdout
    )
    assert profiles.user_profile_dir({"XDG_DATA_HOME": "relative/ignored", "HOME": "/h"}) == (
        Path.home() / ".local/share/melange/profiles"
    )


def test_import_reports_every_problem(tmp_path: Path) -> None:
    document = measured(source="estimate", tpotSeconds=0, colour="red", throughput=[[1, -2], [3]])
    del document["model"]
    path = write(tmp_path, document)
    result = run("profiles", "import", str(path), "--dir", str(tmp_path / "store"))
    assert result.returncode == 2
    assert result.stdout == ""
    errors = result.stderr.splitlines()
    assert errors == [
        f"error: {path}: model: is required",
        f"error: {path}: colour: is not a known field",
        f"error: {path}: source: must be 'measured', got 'estimate'",
        f"error: {path}: tpotSeconds: must be a number > 0, got 0",
        f"error: {path}: throughput[0][1]: must be >= 0, got -2",
        f"error: {path}: throughput: must be 2 x 2: 2 rows (one per input bucket) of 2 columns "
        "(one per output bucket), as the bucket edges give; got 2 rows of 1 or 2 columns "
        "(row 1 has 1)",
    ]
    assert not (tmp_path / "store").exists()


def test_import_rejects_bad_names_edges_and_documents(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    cases = [
        (measured(profile="../escape"), "profile: must be lower-case letters"),
        (
            measured(buckets={"inputTokens": [1, 500, 400], "outputTokens": [1, 200, 2000]}),
            "buckets.inputTokens[2]: must be greater than the previous edge 500, got 400",
        ),
        (measured(costPerHour=-1), "costPerHour: must be > 0, got -1"),
        (["not", "a", "mapping"], "must be a mapping (a profile document), got list"),
    ]
    for document, message in cases:
        result = run("profiles", "import", str(write(tmp_path, document)), "--dir", store)
        assert result.returncode == 2, document
        assert message in result.stderr
    missing = run("profiles", "import", str(tmp_path / "nope.yaml"), "--dir", store)
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr


def test_reimport_needs_force_to_replace_a_different_profile(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    assert (
        run("profiles", "import", str(write(tmp_path, measured())), "--dir", store).returncode == 0
    )
    same = run("profiles", "import", str(write(tmp_path, measured())), "--dir", store)
    assert same.returncode == 0, same.stderr  # re-importing the same profile is harmless
    changed = write(tmp_path, measured(costPerHour=0.8))
    refused = run("profiles", "import", str(changed), "--dir", store)
    assert refused.returncode == 2
    assert "already there; pass --force to replace it" in refused.stderr
    assert run("profiles", "import", str(changed), "--dir", store, "--force").returncode == 0
    shown = run("profiles", "show", "llama-3.1-8b/l4/tpot-50ms-lab", "--dir", store)
    assert yaml.safe_load(shown.stdout)["costPerHour"] == 0.8


def test_a_measured_profile_replaces_the_shipped_estimate_of_its_name(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    shipped = profiles.load_profile(SHIPPED_L4)
    mine = measured(
        profile=SHIPPED_L4, buckets=shipped["buckets"], throughput=shipped["throughput"]
    )
    result = run("profiles", "import", "-", "--dir", store, stdin=yaml.safe_dump(mine))
    assert result.returncode == 0, result.stderr
    assert "replaces the shipped estimate" in result.stdout
    shown = yaml.safe_load(run("profiles", "show", SHIPPED_L4, "--dir", store).stdout)
    assert shown["source"] == "measured"
    lines = run("profiles", "list", "--dir", store).stdout.splitlines()
    assert [line.split()[-1] for line in lines if line.startswith(f"{SHIPPED_L4} ")] == ["measured"]


def test_broken_files_in_the_user_directory_are_warned_about(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "junk.yaml").write_text("profile: [unclosed\n")
    write(store, measured(source="estimate"), "wrong.yaml")
    result = run("profiles", "list", "--dir", str(store))
    assert result.returncode == 0
    assert f"warning: {store}/junk.yaml: cannot read:" in result.stderr
    assert (
        f"warning: {store}/wrong.yaml: not a valid profile: source: must be 'measured', got "
        "'estimate' (ignored)"
    ) in result.stderr
    table = result.stdout.split("\n\n")[0].splitlines()
    assert len(table) == len(profiles.list_profiles()) + 1  # the header and the shipped ones


def test_compare_table(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    cheap = measured()
    big = measured(
        profile="llama-3.1-8b/h100/tpot-50ms-lab",
        name="H100",
        costPerHour=7.2,
        throughput=[[100.0, 50.0], [100.0, 0.0]],
    )
    for k, document in enumerate((cheap, big)):
        path = write(tmp_path, document, f"p{k}.yaml")
        assert run("profiles", "import", str(path), "--dir", store).returncode == 0
    result = run("profiles", "compare", cheap["profile"], big["profile"], "--dir", store)
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    # cost per million = costPerHour / (throughput * 3600) * 1e6
    assert lines[0] == ["INPUT", "OUTPUT", "L4", "H100", "CHEAPEST"]
    assert lines[1] == ["1-500", "1-200", "5.00", "20.00", "L4"]
    assert lines[2] == ["1-500", "200-2000", "50.00", "40.00", "H100"]
    assert lines[3] == ["500-4000", "1-200", "40.00", "20.00", "H100"]
    assert lines[4] == ["500-4000", "200-2000", "-", "-", "-"]  # nobody serves it
    assert f"L4: {cheap['profile']} (measured)" in result.stdout

    data = json.loads(
        run(
            "profiles", "compare", cheap["profile"], big["profile"], "--dir", store, "-o", "json"
        ).stdout
    )
    assert data["rows"][1] == {
        "inputTokens": [1, 500],
        "outputTokens": [200, 2000],
        "costPerMillion": {cheap["profile"]: 50.0, big["profile"]: 40.0},
        "winner": big["profile"],
    }


def test_compare_shipped_profiles_and_errors(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    result = run("profiles", "compare", SHIPPED_L4, SHIPPED_H100, "--dir", store)
    assert result.returncode == 0, result.stderr
    winners = {line.split()[-1] for line in result.stdout.splitlines()[1:49]}
    assert winners <= {"L4", "H100", "-"}
    assert len(result.stdout.splitlines()) == 1 + 48 + 1 + 2  # header, 8x6 buckets, legend

    assert (
        run("profiles", "import", str(write(tmp_path, measured())), "--dir", store).returncode == 0
    )
    mismatch = run(
        "profiles", "compare", SHIPPED_L4, "llama-3.1-8b/l4/tpot-50ms-lab", "--dir", store
    )
    assert mismatch.returncode == 2
    assert mismatch.stderr.startswith(
        "error: profiles must share bucket edges to be compared: llama-3.1-8b/l4/tpot-120ms has "
        "inputTokens [1, 25, 100"
    )
    unknown = run("profiles", "compare", SHIPPED_L4, "nope/x", "--dir", store)
    assert unknown.returncode == 2
    assert "unknown profile 'nope/x'; available:" in unknown.stderr


@pytest.mark.parametrize("name", ["a", "llama-3.1-8b/l4/tpot-40ms", "x_y.z/1"])
def test_profile_names_accepted(name: str) -> None:
    assert profiles.validate_profile(measured(profile=name)) == []
