"""Every notebook runs top to bottom, in order, on the smoke dataset, through the parameters a user sets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import papermill as pm
import pytest

from kernel_utils.dev.fault_injection import checkpoint_fault_paths, inject_checkpoint_faults
from kernel_utils.dev.pipeline import kernel_options
from kernel_utils.dev.run_summary import format_summary, run_summary
from kernel_utils.metric import competition_loss, long_to_wide

EXTRA_BACKBONE = "resnet10t"  # a second per-vertebra model, beside the smoke profile's EfficientNetV2
NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def executed(faulted_smoke, work_dir) -> dict[str, Exception | None]:
    """Every notebook run once, in order, in one work dir, on the smoke data with every dataset fault of
    `inject_data_faults` and two corrupt checkpoints: name -> the error it raised, or None.

    Each notebook's test reads its entry, so any one of them (or the bundle test) can run alone.
    """
    data_dir, _ = faulted_smoke
    inject_checkpoint_faults(work_dir, "smoke")
    results: dict[str, Exception | None] = {}
    (work_dir / "executed").mkdir(exist_ok=True)
    for notebook in NOTEBOOKS:
        try:
            pm.execute_notebook(str(notebook), str(work_dir / "executed" / notebook.name), parameters={
                "DATA_DIR": str(data_dir), "WORK_DIR": str(work_dir), "PROFILE": "smoke",
                "EXTRA_VERTEBRA_MODELS": EXTRA_BACKBONE},  # 03's only; the others ignore it
                cwd=str(notebook.parent), progress_bar=False, kernel_name="python3", **kernel_options())
            results[notebook.name] = None
        except Exception as e:  # reported by that notebook's own test
            results[notebook.name] = e
    return results


def test_notebook_kernels_talk_over_socket_files_on_linux():
    options = kernel_options()  # what make run and these tests execute the notebooks with
    if not sys.platform.startswith("linux"):
        assert options == {}
        return
    assert options["kernel_manager_class"](kernel_name="python3").transport == "ipc"


def test_notebooks_are_committed_clean_with_parameters():
    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert "parameters" in code[0].get("metadata", {}).get("tags", []), path.name
        params = "".join(code[0]["source"])
        for name in ("DATA_DIR", "WORK_DIR", "PROFILE"):
            assert f"{name} = " in params, (path.name, name)
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), path.name


def test_no_fault_ends_the_run_loses_a_study_or_goes_unnamed(executed, work_dir, faulted_smoke):
    data_dir, faults = faulted_smoke
    assert all(error is None for error in executed.values())
    summary = pd.read_csv(work_dir / "preprocess_summary.csv").set_index("StudyInstanceUID")
    assert (summary.status != "failed").all(), summary[summary.status == "failed"].error
    for fault in faults.itertuples():
        assert Path(fault.file).name in str(summary.loc[fault.uid, "warnings"]), fault.fault
    assert not summary.loc[faults[faults.fault == "NIfTI one slice short"].uid.iloc[0], "has_mask"]
    assert summary.loc[faults[faults.fault == "NIfTI origin shifted 50 mm"].uid.iloc[0], "has_mask"]
    for path in checkpoint_fault_paths(work_dir, "smoke"):  # set aside, and the fold trained again
        assert path.with_name(path.name + ".corrupt").exists() and path.exists()
    submission = pd.read_csv(work_dir / "submission.csv")
    assert sorted(submission.row_id) == sorted(pd.read_csv(data_dir / "test.csv").row_id)
    for name in ("cnn_lstm_vertebra", "vit3d"):  # every faulted test study kept its images: the models predicted it
        predicted = set(pd.read_csv(work_dir / "predictions" / f"{name}_test.csv").StudyInstanceUID)
        assert set(faults[faults.split == "test"].uid) <= predicted, name


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_on_smoke_data(notebook, executed, work_dir):
    if executed[notebook.name] is not None:
        raise executed[notebook.name]
    assert (work_dir / "executed" / notebook.name).exists()
    if notebook.name.startswith("01_"):
        assert (work_dir / "preprocess_summary.csv").exists()
        assert len(list((work_dir / "cache").glob("*/*.npz"))) == 16
    if notebook.name.startswith("03_"):  # the extra backbone is a model of its own, beside the form's main one
        predictions = work_dir / "predictions"
        main = json.loads((predictions / "cnn_lstm_vertebra.json").read_text())
        extra = json.loads((predictions / f"cnn_lstm_vertebra_{EXTRA_BACKBONE}.json").read_text())
        assert (main["settings"]["variant"], extra["settings"]["variant"]) == ("", EXTRA_BACKBONE)
        assert extra["settings"]["model"] == EXTRA_BACKBONE != main["settings"]["model"]
        assert extra["run_name"] != main["run_name"]
    if notebook.name.startswith("05_"):
        models = json.loads((work_dir / "predictions" / "ensemble.json").read_text())["models"]
        assert {"cnn_lstm_vertebra", f"cnn_lstm_vertebra_{EXTRA_BACKBONE}", "vit3d", "prior"} <= set(models)


def test_the_run_summary_reads_what_the_notebooks_wrote(executed, work_dir, faulted_smoke):
    data_dir, _ = faulted_smoke
    summary = run_summary(data_dir, work_dir, {"01_preprocess": 5.0, "05_ensemble_submission": 2.0})
    table = pd.read_csv(work_dir / "predictions" / "ensemble_table.csv", index_col="model")
    assert set(summary["models"]) == {m for m in table.index if m in models_with_predictions(work_dir)} | {"prior"}
    for name, m in summary["models"].items():
        assert m["oof_loss"] == pytest.approx(table.loss_study[name])
        assert m["over_prior"] == pytest.approx(table.loss_study[name] / table.loss_study["prior"])
    hidden = summary["hidden_test"]
    truth = pd.read_csv(data_dir / "_truth" / "test_labels.csv")
    assert hidden["studies"] == len(truth)
    submitted = long_to_wide(pd.read_csv(work_dir / "submission.csv"))
    assert hidden["loss"] == pytest.approx(competition_loss(truth, submitted))
    text = format_summary(summary)
    assert all(name in text for name in summary["models"]) and "7 in all" in text
    saved = json.loads((work_dir / "run_summary.json").read_text())
    assert saved["submission"]["from"] == summary["submission"]["from"]


def models_with_predictions(work_dir: Path) -> set[str]:
    return {p.name.removesuffix("_oof.csv") for p in (work_dir / "predictions").glob("*_oof.csv")}


def test_kaggle_bundle_runs_alone(executed, work_dir, faulted_smoke, tmp_path):
    """The bundle holds what its notebook imports, and the notebook writes a valid submission from it alone."""
    assert all(error is None for error in executed.values())
    import subprocess
    import sys

    from kernel_utils.dev.bundle import make_bundle
    from kernel_utils.submit.writer import validate_submission

    out = make_bundle(work_dir, tmp_path / "kaggle")
    dataset = out / "dataset"
    assert (dataset / "work" / "predictions" / "ensemble.json").exists()
    assert (dataset / "kernel_utils" / "submit").is_dir() and not (dataset / "kernel_utils" / "dev").exists()
    assert list((dataset / "work").rglob("*_best.pt"))
    assert json.loads((out / "kernel" / "kernel-metadata.json").read_text())["enable_internet"] is False
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import kernel_utils.submit.predict, kernel_utils; "
             "print(kernel_utils.__file__)")
    found = subprocess.run([sys.executable, "-c", probe, str(dataset)], capture_output=True, text=True, check=True)
    assert found.stdout.strip().startswith(str(dataset))
    smoke_dir, _ = faulted_smoke  # the faulted test studies go through the kernel's own preprocessing
    kernel_work = tmp_path / "kernel_work"
    pm.execute_notebook(str(out / "kernel" / "submission.ipynb"), str(tmp_path / "executed.ipynb"),
                        parameters={"BUNDLE_DIR": str(dataset), "DATA_DIR": str(smoke_dir),
                                    "WORK_DIR": str(kernel_work), "ALL_MODELS": True},  # the whole chain runs
                        progress_bar=False, kernel_name="python3", **kernel_options())
    validate_submission(kernel_work / "submission.csv", smoke_dir / "test.csv")
    timing = json.loads((kernel_work / "predictions" / "inference_timing.json").read_text())
    assert {"load_and_window", "localise", "vit3d", f"cnn_lstm_vertebra_{EXTRA_BACKBONE}"} <= \
        set(timing["per_study_seconds"])
    assert 0 < timing["data_share"] < 1
    assert len(pd.read_csv(kernel_work / "submission.csv")) == len(pd.read_csv(smoke_dir / "test.csv"))
    # study by study and in memory, the kernel predicts what notebooks 02-05 predicted for the same studies
    assert not (kernel_work / "localisation" / "vertebrae.csv").exists()
    ours = pd.read_csv(work_dir / "submission.csv").set_index("row_id").fractured
    kernels = pd.read_csv(kernel_work / "submission.csv").set_index("row_id").fractured.loc[ours.index]
    assert np.allclose(kernels, ours, atol=1e-4), (kernels - ours).abs().max()
