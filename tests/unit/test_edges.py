"""Bucket edges as a first-class check: a profile serves only the edges it was made for.

Composing a spec from profiles and a workload (`melange solve --profile`, `melange profiles show
--workload`) refuses a profile made for other edges in one line naming both edge sets, also when
the matrix shapes happen to match; `melange workload --edges-from` takes a profile's edges, and
says when quantile edges fit no profile; a profile that serves no bucket is refused when loaded.
"""

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

from melange.tools import perfmodel, profiles
from melange.tools.profiles import build

MELANGE = shutil.which("melange", path=str(Path(sys.executable).parent)) or "melange"
L4 = "llama-3.1-8b/l4/tpot-120ms"
H100 = "llama-3.1-8b/h100/tpot-120ms"
L40S = "llama-3.1-8b/l40s/tpot-120ms"
L4_40MS = "llama-3.1-8b/l4/tpot-40ms"
SHIPPED_IN = [1, 25, 100, 250, 500, 1000, 2000, 4000, 8000]
SHIPPED_OUT = [1, 25, 100, 250, 500, 1000, 2000]
SHIPPED = f"input edges {SHIPPED_IN} / output edges {SHIPPED_OUT}"
# what `melange workload` gives without edges: quantiles of the log
QUANTILE_IN = [1, 378, 775, 1136, 1550, 1964, 2313, 2637, 3001]
QUANTILE_OUT = [1, 120, 236, 348, 463, 560, 683, 798, 901]
# the shipped profiles' shape (8 x 6), other edges
SAME_SHAPE_IN = [1, 50, 100, 200, 400, 800, 1600, 3200, 6400]
SAME_SHAPE_OUT = [1, 50, 100, 200, 400, 800, 1600]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "MELANGE_PROFILES_DIR"}
    return subprocess.run(
        [MELANGE, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=environ,
    )


def workload_file(tmp_path: Path, ins: list[int], outs: list[int], name: str = "w.yaml") -> Path:
    """The `buckets` and `workload` blocks, as `melange workload` prints them."""
    fragment = {
        "buckets": {"inputTokens": ins, "outputTokens": outs},
        "workload": {
            "distribution": [[1] * (len(outs) - 1) for _ in ins[1:]],
            "totalRate": 5,
        },
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(fragment), encoding="utf-8")
    return path


def measured(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "profile": "llama-3.1-8b/l4/tpot-50ms-lab",
        "name": "L4",
        "costPerHour": 0.72,
        "model": "llama-3.1-8b",
        "tpotSeconds": 0.05,
        "buckets": {"inputTokens": [1, 500, 4000], "outputTokens": [1, 200, 2000]},
        "source": "measured",
        "throughput": [[40.0, 4.0], [5.0, 1.0]],
    }
    document.update(changes)
    return document


def store_with(tmp_path: Path, *documents: dict[str, Any]) -> Path:
    store = tmp_path / "store"
    store.mkdir()
    for k, document in enumerate(documents):
        (store / f"p{k}.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")
    return store


# --- melange solve --profile ----------------------------------------------------------------------


def test_solve_refuses_profiles_made_for_other_edges_in_one_line(tmp_path: Path) -> None:
    path = workload_file(tmp_path, QUANTILE_IN, QUANTILE_OUT)
    result = run("solve", str(path), "--profile", L4, "--profile", H100)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: profiles {L4}, {H100} were made for {SHIPPED}; "
        f"the workload's are {QUANTILE_IN} / {QUANTILE_OUT}"
    ]


def test_a_matching_shape_does_not_hide_other_edges(tmp_path: Path) -> None:
    path = workload_file(tmp_path, SAME_SHAPE_IN, SAME_SHAPE_OUT)
    result = run("solve", str(path), "--profile", L4)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: profile {L4} was made for {SHIPPED}; "
        f"the workload's are {SAME_SHAPE_IN} / {SAME_SHAPE_OUT}"
    ]


def test_solve_with_profiles_made_for_the_workloads_edges(tmp_path: Path) -> None:
    path = workload_file(tmp_path, SHIPPED_IN, SHIPPED_OUT)
    result = run("solve", str(path), "--profile", L4, "--profile", L40S, "-o", "json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["status"] == "Optimal"
    assert [g["name"] for g in plan["gpus"]] == ["L4", "L40S"]


def test_solve_profiles_join_the_gpus_a_spec_already_has(tmp_path: Path) -> None:
    spec = yaml.safe_load(workload_file(tmp_path, [1, 500, 4000], [1, 200, 2000]).read_text())
    spec["gpus"] = [{"name": "A100", "costPerHour": 3.0, "throughput": [[50, 5], [6, 1]]}]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"spec": spec}), encoding="utf-8")
    store = store_with(tmp_path, measured())
    result = run(
        "solve", str(path), "--profile", "llama-3.1-8b/l4/tpot-50ms-lab", "--profiles-dir",
        str(store), "-o", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [g["name"] for g in json.loads(result.stdout)["gpus"]] == ["A100", "L4"]


def test_a_user_profile_is_held_to_its_own_edges(tmp_path: Path) -> None:
    store = store_with(tmp_path, measured())
    name = "llama-3.1-8b/l4/tpot-50ms-lab"
    other = workload_file(tmp_path, [1, 100, 1000], [1, 100, 1000])  # 2 x 2 as well
    result = run("solve", str(other), "--profile", name, "--profiles-dir", str(store))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: profile {name} was made for input edges [1, 500, 4000] / output edges "
        "[1, 200, 2000]; the workload's are [1, 100, 1000] / [1, 100, 1000]"
    ]
    own = workload_file(tmp_path, [1, 500, 4000], [1, 200, 2000], "own.yaml")
    solved = run("solve", str(own), "--profile", name, "--profiles-dir", str(store))
    assert solved.returncode == 0, solved.stderr


def test_solve_profile_errors_exit_2(tmp_path: Path) -> None:
    path = workload_file(tmp_path, SHIPPED_IN, SHIPPED_OUT)
    unknown = run("solve", str(path), "--profile", "nope")
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("error: unknown profile 'nope'; available: llama-3.1-")
    withheld = run("solve", str(path), "--profile", L4_40MS)
    assert withheld.returncode == 2
    assert withheld.stderr.startswith(f"error: profile {L4_40MS} is not shipped: ")
    no_workload = tmp_path / "edges.yaml"
    no_workload.write_text(yaml.safe_dump({"buckets": {"inputTokens": SHIPPED_IN}}))
    invalid = run("solve", str(no_workload), "--profile", L4)
    assert invalid.returncode == 2
    assert invalid.stderr.splitlines() == [
        "error: buckets.outputTokens: is required",
        "error: workload: is required",
    ]


# --- melange profiles show --workload -------------------------------------------------------------


def test_profiles_show_checks_the_edges_of_a_workload(tmp_path: Path) -> None:
    other = workload_file(tmp_path, SAME_SHAPE_IN, SAME_SHAPE_OUT)
    refused = run("profiles", "show", L4, "--entry-only", "--workload", str(other))
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert refused.stderr.splitlines() == [
        f"error: profile {L4} was made for {SHIPPED}; "
        f"the workload's are {SAME_SHAPE_IN} / {SAME_SHAPE_OUT}"
    ]
    own = workload_file(tmp_path, SHIPPED_IN, SHIPPED_OUT, "own.yaml")
    shown = run("profiles", "show", L4, "--entry-only", "--workload", str(own))
    assert shown.returncode == 0, shown.stderr
    assert set(yaml.safe_load(shown.stdout)) == {"name", "costPerHour", "throughput"}


# --- melange workload: --edges-from, and quantile edges that fit no profile ------------------------


LOG = "\n".join(
    json.dumps({"timestamp": t, "input_tokens": 1 + (t * 37) % 3000, "output_tokens": 1 + t % 900})
    for t in range(500)
)


def test_workload_takes_a_shipped_profiles_edges(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text(LOG)
    result = run("workload", str(log), "--edges-from", L4)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    data = yaml.safe_load(result.stdout)
    assert data["buckets"] == {"inputTokens": SHIPPED_IN, "outputTokens": SHIPPED_OUT}
    path = tmp_path / "w.yaml"
    path.write_text(result.stdout)
    assert run("solve", str(path), "--profile", L4, "--profile", H100).returncode == 0


def test_workload_takes_a_user_profiles_edges(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text(LOG)
    store = store_with(tmp_path, measured())
    result = run(
        "workload", str(log), "--edges-from", "llama-3.1-8b/l4/tpot-50ms-lab",
        "--profiles-dir", str(store),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["buckets"] == {
        "inputTokens": [1, 500, 4000],
        "outputTokens": [1, 200, 2000],
    }


def test_workload_edges_from_errors(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text(LOG)
    both = run("workload", str(log), "--edges-from", L4, "--input-edges", "1,10")
    assert both.returncode == 2
    assert both.stderr.splitlines() == [
        "error: give --edges-from, --input-edges/--output-edges or --allocation, not two"
    ]
    unknown = run("workload", str(log), "--edges-from", "nope")
    assert unknown.returncode == 2
    assert "error: unknown profile 'nope'" in unknown.stderr
    withheld = run("workload", str(log), "--edges-from", L4_40MS)
    assert withheld.returncode == 2
    assert withheld.stderr.startswith(f"error: profile {L4_40MS} is not shipped: ")


QUANTILE_WARNING = (
    "warning: these quantile edges fit no shipped or imported profile (a profile serves only the "
    "bucket edges it was made for); to solve with one, take its edges with --edges-from PROFILE, "
    f"e.g. --edges-from {profiles.list_profiles()[0].name}"
)


def test_quantile_edges_that_fit_no_profile_are_pointed_out(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text(LOG)
    quantiles = run("workload", str(log))
    assert quantiles.returncode == 0
    assert quantiles.stderr.splitlines() == [QUANTILE_WARNING]
    one_axis = run("workload", str(log), "--input-edges", ",".join(map(str, SHIPPED_IN)))
    assert one_axis.returncode == 0
    assert one_axis.stderr.splitlines() == [QUANTILE_WARNING]
    given = run(
        "workload", str(log), "--input-edges", ",".join(map(str, SHIPPED_IN)),
        "--output-edges", ",".join(map(str, SHIPPED_OUT)),
    )  # fmt: skip
    assert given.returncode == 0
    assert given.stderr == ""


def test_quantile_edges_that_fit_a_user_profile_pass_quietly(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps({"input_tokens": n, "output_tokens": n}) for n in (3, 10)))
    one_bucket = measured(
        buckets={"inputTokens": [1, 11], "outputTokens": [1, 11]}, throughput=[[3.0]]
    )
    store = store_with(tmp_path, one_bucket)
    args = ("workload", str(log), "--buckets", "1", "--rate", "1")
    assert run(*args, "--profiles-dir", str(store)).stderr == ""
    assert run(*args, "--profiles-dir", str(tmp_path / "empty")).stderr.splitlines() == [
        QUANTILE_WARNING
    ]


# --- profiles that serve nothing ------------------------------------------------------------------

ZERO = measured(throughput=[[0.0, 0.0], [0.0, 0.0]])
ZERO_LINE = (
    "throughput: every entry is 0: profile llama-3.1-8b/l4/tpot-50ms-lab serves no bucket, so it "
    "has no place in a spec"
)


def test_a_profile_that_serves_nothing_is_refused() -> None:
    assert profiles.check_profile(ZERO) == [ZERO_LINE]
    assert profiles.check_profile(measured()) == []
    assert profiles.validate_profile(ZERO) == []  # a measurement may find all zeros


def test_import_and_use_refuse_a_profile_that_serves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "zero.yaml"
    path.write_text(yaml.safe_dump(ZERO))
    imported = run("profiles", "import", str(path), "--dir", str(tmp_path / "imported"))
    assert imported.returncode == 2
    assert imported.stderr.splitlines() == [f"error: {path}: {ZERO_LINE}"]
    store = store_with(tmp_path, ZERO)
    warning = f"warning: {store}/p0.yaml: not a valid profile: {ZERO_LINE} (ignored)"
    listed = run("profiles", "list", "--dir", str(store))
    assert listed.returncode == 0
    assert listed.stderr.splitlines() == [warning]
    assert "tpot-50ms-lab" not in listed.stdout
    spec = workload_file(tmp_path, [1, 500, 4000], [1, 200, 2000])
    solved = run(
        "solve", str(spec), "--profile", "llama-3.1-8b/l4/tpot-50ms-lab", "--profiles-dir",
        str(store),
    )  # fmt: skip
    assert solved.returncode == 2
    assert solved.stderr.splitlines()[0] == warning
    assert solved.stderr.splitlines()[1].startswith(
        "error: unknown profile 'llama-3.1-8b/l4/tpot-50ms-lab'"
    )


def test_a_shipped_profile_that_serves_nothing_is_refused_when_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    document = perfmodel.build_profile(perfmodel.GPUS["L4"], perfmodel.MODELS["llama-3.1-8b"], 0.04)
    (tmp_path / "l4.yaml").write_text(build.render_profile(document))
    monkeypatch.setattr(profiles, "_data", lambda: tmp_path)
    with pytest.raises(profiles.ProfileError) as caught:
        profiles.load_profile(L4_40MS)
    assert caught.value.errors == [
        f"shipped profile {L4_40MS} is not valid: throughput: every entry is 0: profile "
        f"{L4_40MS} serves no bucket, so it has no place in a spec"
    ]


def test_every_shipped_profile_carries_valid_edges_and_serves_some_bucket() -> None:
    listed = profiles.list_profiles()
    assert listed
    for info in listed:
        document = profiles.load_profile(info.name)
        assert profiles.check_profile(document, shipped=True) == []
        assert profiles.edges_of(document) == (SHIPPED_IN, SHIPPED_OUT)
        assert document["estimate"]["buckets"] == document["buckets"]


def test_the_l4_at_40ms_is_left_out_and_listed_with_the_reason() -> None:
    # a true result of the model, not a bug: the weights alone take longer than the SLO per step
    l4, model = perfmodel.GPUS["L4"], perfmodel.MODELS["llama-3.1-8b"]
    assert model.weight_bytes / l4.effective_bandwidth > 0.040
    assert perfmodel.request_throughput(l4, model, 1, 1, 0.040) == 0.0
    left_out = set(perfmodel.generate_shipped_profiles()) - set(build.shipped_profiles())
    assert {name for name in left_out if name.startswith("llama-3.1-8b/")} == {L4_40MS}
    assert left_out == set(profiles.withheld_profiles())
    reason = profiles.withheld_profiles()[L4_40MS]
    assert reason == (
        "the performance model estimates one L4 cannot serve any bucket of llama-3.1-8b within a "
        "40 ms TPOT: every decode step reads the 16.06 GB of weights at 230 GB/s (76% of 300 "
        "GB/s), 70.0 ms, plus 1.76 ms of engine overhead"
    )
    listing = run("profiles", "list")
    assert listing.returncode == 0
    assert f"{L4_40MS} is not shipped: {reason}" in listing.stdout.splitlines()
    assert f"{L4_40MS} " not in listing.stdout.split("\n\n")[0]
    shown = run("profiles", "show", L4_40MS)
    assert shown.returncode == 2
    assert shown.stderr.splitlines() == [f"error: profile {L4_40MS} is not shipped: {reason}"]


# --- the pure checks ------------------------------------------------------------------------------


def test_compose_spec_checks_edges_before_shapes() -> None:
    profile = profiles.load_profile(L4)
    spec = {
        "buckets": {"inputTokens": [1, 100], "outputTokens": [1, 100]},
        "workload": {"distribution": [[1]], "totalRate": 1},
    }
    with pytest.raises(profiles.ProfileError) as caught:
        profiles.compose_spec(spec, {L4: profile})
    assert caught.value.errors == [
        f"profile {L4} was made for {SHIPPED}; the workload's are [1, 100] / [1, 100]"
    ]
    # integral floats are the integers the spec reads them as
    floats = {
        "buckets": {"inputTokens": [float(e) for e in SHIPPED_IN], "outputTokens": SHIPPED_OUT}
    }
    composed = profiles.compose_spec(floats, {L4: profile})
    assert composed["gpus"] == [profiles.gpu_entry(profile)]
    assert profiles.edges_mismatch(L4, profile, (SHIPPED_IN, SHIPPED_OUT)) is None


def test_solve_with_profiles_holds_the_text_to_the_same_limits(tmp_path: Path) -> None:
    rows = "[" + ", ".join(["[1, 1, 1, 1, 1, 1]"] * 8) + "]"
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(
        "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
        + "".join(
            f"{x}: &{x} [{', '.join([f'*{p}'] * 10)}]\n"
            for p, x in zip("abcde", "bcdef", strict=True)
        )
    )
    refused = run("solve", str(bomb), "--profile", L4)
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        f"error: {bomb}: holds more than 200000 values with its YAML aliases expanded (an "
        "allocation holds at most about 17,000)"
    ]
    listed = run("solve", "-", "--profile", L4, stdin="[1, 2]")
    assert (listed.returncode, listed.stderr) == (
        2,
        "error: document: must be a mapping, got a list of 2\n",
    )
    # an exponent float is a number here as in any spec
    text = f"buckets: {{inputTokens: {SHIPPED_IN}, outputTokens: {SHIPPED_OUT}}}\n"
    text += f"workload: {{distribution: {rows}, totalRate: 1e1}}\n"
    solved = run("solve", "-", "--profile", L4, "-o", "json", stdin=text)
    assert solved.returncode == 0, solved.stderr
    assert json.loads(solved.stdout)["totalRate"] == 10.0
