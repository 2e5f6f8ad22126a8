"""Fine-tuning data: source tables, patient-level splits, train subsampling, the image cache, bad input."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from ingest.phantoms import generate_task_set
from pedx_ray.datasets import (
    DatasetError,
    assign_splits,
    cache_images,
    dicom_table,
    grazpedwri_table,
    phantom_table,
    read_images,
    rsna_table,
    subsample_train,
)


@pytest.fixture(scope="module")
def fracture_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fracture")
    generate_task_set(root, "fracture", n=12, seed=3)
    return root


def write_pngs(folder: Path, ids, size=(40, 30)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in ids:
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 255, size, dtype=np.uint8))


def many_patients(n: int = 400, images_per_patient: int = 2) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"img{i}" for i in range(n * images_per_patient)],
            "patient_id": [f"p{i // images_per_patient}" for i in range(n * images_per_patient)],
            "split": "",
        }
    )


def test_phantom_fracture_table_is_split_by_patient(fracture_set):
    table = phantom_table(fracture_set, "fracture")
    assert set(table["target"]) == {0.0, 1.0}
    assert table["patient_id"].duplicated().any()  # studies hold several views: the split must group them
    split = assign_splits(table, 0.3, 0.3, seed=0)
    assert split.groupby("patient_id")["split"].nunique().max() == 1
    assert (
        split["split"].tolist()
        == assign_splits(table.sample(frac=1, random_state=1), 0.3, 0.3, 0).loc[table.index, "split"].tolist()
    )  # row order does not matter


def test_split_fractions_hold_and_seed_changes_the_draw():
    table = many_patients()
    split = assign_splits(table, 0.15, 0.15, seed=0)
    shares = split.drop_duplicates("patient_id")["split"].value_counts(normalize=True)
    assert shares["val"] == pytest.approx(0.15, abs=0.05)
    assert shares["test"] == pytest.approx(0.15, abs=0.05)
    assert not split["split"].equals(assign_splits(table, 0.15, 0.15, seed=1)["split"])


def test_rows_with_an_official_split_keep_it():
    table = many_patients(10).assign(split=["test"] * 2 + [""] * 18)
    assert (assign_splits(table, 0.5, 0.0, seed=0)["split"][:2] == "test").all()


def test_train_subsample_is_seeded_nested_and_leaves_val_and_test_alone():
    table = assign_splits(many_patients(), 0.15, 0.15, seed=0)
    n_train = int((table["split"] == "train").sum())
    small = subsample_train(table, fraction=0.25, seed=7)
    large = subsample_train(table, fraction=0.5, seed=7)
    again = subsample_train(table, fraction=0.25, seed=7)
    ids = {
        name: set(t.loc[t["split"] == "train", "id"])
        for name, t in (("s", small), ("l", large), ("a", again))
    }
    assert len(ids["s"]) == round(0.25 * n_train)
    assert ids["s"] == ids["a"]
    assert ids["s"] <= ids["l"]
    assert ids["s"] != set(subsample_train(table, fraction=0.25, seed=8).query("split == 'train'")["id"])
    for frame in (small, large):
        assert frame[frame["split"] != "train"].equals(table[table["split"] != "train"])
    assert (subsample_train(table, size=10, seed=0)["split"] == "train").sum() == 10
    with pytest.raises(DatasetError, match="exceeds"):
        subsample_train(table, size=n_train + 1)


def test_rsna_table_with_official_lists(tmp_path):
    write_pngs(tmp_path / "train", [1, 2, 3, 4])
    write_pngs(tmp_path / "valid", [10])
    write_pngs(tmp_path / "test" / "nested", [20])
    pd.DataFrame(
        {"id": [1, 2, 3, 4], "boneage": [30, 60, 90, 120], "male": [True, False, True, False]}
    ).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"Image ID": [10], "male": [True], "Bone Age (months)": [100]}).to_csv(
        tmp_path / "val.csv", index=False
    )
    pd.DataFrame({"Case ID": [20], "Sex": ["F"], "Ground truth bone age (months)": [77.5]}).to_csv(
        tmp_path / "test.csv", index=False
    )
    table = rsna_table(
        tmp_path / "train.csv", tmp_path, tmp_path / "val.csv", tmp_path / "test.csv"
    ).set_index("id")
    assert table.loc["10", "split"] == "val" and table.loc["20", "split"] == "test"
    assert table.loc["20", "target"] == 77.5 and table.loc["20", "sex"] == 0.0
    assert table.loc["1", "sex"] == 1.0 and table.loc["1", "split"] == ""
    assert Path(table.loc["20", "path"]).name == "20.png"


def test_rsna_csv_with_wrong_columns_says_which(tmp_path):
    write_pngs(tmp_path, [1])
    pd.DataFrame({"id": [1], "age": [30], "male": [True]}).to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(DatasetError, match=r"lacks column\(s\) \['boneage'\].*has \['id', 'age', 'male'\]"):
        rsna_table(tmp_path / "train.csv", tmp_path)


def test_missing_image_file_is_named(tmp_path):
    write_pngs(tmp_path, [1])
    pd.DataFrame({"id": [1, 2], "boneage": [30, 40], "male": [1, 0]}).to_csv(
        tmp_path / "train.csv", index=False
    )
    with pytest.raises(DatasetError, match=r"1 image file\(s\) missing .*: 2 "):
        rsna_table(tmp_path / "train.csv", tmp_path)


def test_grazpedwri_blank_fracture_cells_mean_no_fracture(tmp_path):
    write_pngs(tmp_path, ["0001_a_01", "0002_b_01"])
    (tmp_path / "dataset.csv").write_text(
        "filestem,patient_id,gender,age,fracture_visible\n0001_a_01,1,M,10.5,1\n0002_b_01,2,F,7,\n"
    )
    table = grazpedwri_table(tmp_path / "dataset.csv", tmp_path)
    assert table["target"].tolist() == [1.0, 0.0]
    assert table["age_months"].tolist() == [126.0, 84.0]
    assert table["sex"].tolist() == [1.0, 0.0]


def test_image_cache_preprocesses_once_and_keys_by_parameters(fracture_set, tmp_path):
    table = phantom_table(fracture_set, "fracture").head(3)
    cached = cache_images(table, image_size=48, enhance="clahe", cache_dir=tmp_path, progress=False)
    images = read_images(cached["image"].tolist())
    assert images.shape == (3, 48, 48) and images.dtype == np.uint8
    stamps = [os.stat(p).st_mtime_ns for p in cached["image"]]
    again = cache_images(table, image_size=48, enhance="clahe", cache_dir=tmp_path, progress=False)
    assert [os.stat(p).st_mtime_ns for p in again["image"]] == stamps  # reused, not rewritten
    plain = cache_images(table, image_size=48, enhance="none", cache_dir=tmp_path, progress=False)
    assert set(plain["image"]).isdisjoint(cached["image"])
    assert not np.array_equal(read_images(plain["image"].tolist()), images)  # CLAHE changed the pixels
    assert not list(tmp_path.glob(".*partial*"))


def test_dicom_catalog_with_a_labels_csv_gives_the_phantom_table(fracture_set, tmp_path):
    from ingest.dataset.catalog import scan

    scan(fracture_set, tmp_path / "catalog", id_salt="test-salt", scheduler="sync", progress=False)
    labels = tmp_path / "labels.csv"
    pd.read_csv(fracture_set / "ground_truth.csv")[["sop_instance_uid", "fracture"]].to_csv(
        labels, index=False
    )
    table = dicom_table(tmp_path / "catalog", labels, "fracture").set_index("id").sort_index()
    truth = phantom_table(fracture_set, "fracture").set_index("id").sort_index()
    assert table.index.equals(truth.index)
    assert table["target"].equals(truth["target"]) and table["sex"].equals(truth["sex"])
    assert not set(table["patient_id"]) & set(truth["patient_id"])  # hashed, never the raw id
    assert (
        table.groupby("patient_id").size().sort_values().tolist()
        == truth.groupby("patient_id").size().sort_values().tolist()
    )
    pd.DataFrame({"sop_instance_uid": ["1.2.3"], "fracture": [1]}).to_csv(labels, index=False)
    with pytest.raises(DatasetError, match=r"1 labelled instance\(s\) are not readable images"):
        dicom_table(tmp_path / "catalog", labels, "fracture")
    with pytest.raises(DatasetError, match=r"lacks column\(s\) \['bone_age_months'\]"):
        dicom_table(tmp_path / "catalog", labels, "bone_age")
