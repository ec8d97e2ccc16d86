"""optuna-dashboard, headless: its JSON API shows the retention series and the triage user attrs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import optuna
import pytest
from optuna_dashboard import wsgi

from search.objective import make_objective
from search.space import defaults
from search.study import StudySettings, make_pruner
from train.loop import preset_config

pytestmark = pytest.mark.filterwarnings("ignore:Fixed parameter matrix_lr:UserWarning")


def _get(app, path: str) -> tuple[str, dict]:
    """One GET through the WSGI app, as a browser's fetch would do it."""
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "test",
               "SERVER_PORT": "80", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""),
               "wsgi.errors": io.StringIO(), "wsgi.version": (1, 0), "wsgi.multithread": False,
               "wsgi.multiprocess": False, "wsgi.run_once": False}
    seen: dict[str, str] = {}

    def start_response(status: str, headers: list, exc_info=None):
        seen["status"] = status

    body = b"".join(app(environ, start_response))
    return seen["status"], json.loads(body)


@pytest.fixture(scope="module")
def study(prepared_cache: Path) -> optuna.Study:
    base = preset_config("tiny", cache_dir=prepared_cache, step_budget=8, threads=1)
    settings = StudySettings(base=base, triage_at=4, threshold=0.8)
    study = optuna.create_study(study_name="dash", direction="minimize", pruner=make_pruner(settings))
    study.enqueue_trial(defaults(base))
    study.enqueue_trial(defaults(base) | {"matrix_lr": 1000.0})  # collapses: pruned at step 4
    study.optimize(make_objective(base, triage_at=4, threshold=0.8, audit=False), n_trials=2)
    return study


def test_dashboard_json_shows_retention_and_triage_attrs(study: optuna.Study) -> None:
    app = wsgi(study._storage)
    status, studies = _get(app, "/api/studies")
    assert status.startswith("200")
    study_id = next(s["study_id"] for s in studies["study_summaries"] if s["study_name"] == "dash")
    status, detail = _get(app, f"/api/studies/{study_id}")
    assert status.startswith("200")
    trials = {t["state"]: t for t in detail["trials"]}
    assert set(trials) == {"Complete", "Pruned"}
    for state, trial in trials.items():
        frozen = study.trials[trial["number"]]
        steps = [point["step"] for point in trial["intermediate_values"]]
        assert steps == sorted(frozen.intermediate_values) and steps[0] == 1
        values = [point["value"] for point in trial["intermediate_values"]]
        assert values == pytest.approx([frozen.intermediate_values[s] for s in steps])  # the retention series
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        for key in ("curve_retention", "curve_train_loss", "triage_step", "triage_retention", "training_seconds"):
            assert key in attrs, (state, key)
    completed = {a["key"]: a["value"] for a in trials["Complete"]["user_attrs"]}
    for key in ("val_bpb", "eff_rank_init", "eff_rank_final", "rank_retention", "grad_coherence", "num_steps",
                "device", "preset"):
        assert key in completed, key
    pruned = {a["key"]: a["value"] for a in trials["Pruned"]["user_attrs"]}
    assert pruned["prune_reason"] == "rank_collapse" and pruned["prune_step"] == "4"
    assert float(pruned["prune_retention"]) < float(pruned["prune_threshold"]) == 0.8
    assert float(pruned["pruned_val_bpb_quick"]) > 0 and "budget_seconds_saved" in pruned
    assert "val_bpb" not in pruned
