from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest

from ingest.dataset.balance import BalanceConfig, BalanceError, balance
from ingest.dataset.taxonomy import load_taxonomy


def synthetic_catalog(n=6000, patients=1500, seed=0, classes=None):
    taxonomy = load_taxonomy()
    views = [v for v in taxonomy.views if classes is None or v.label_7 in classes]
    rng = np.random.default_rng(seed)
    view = rng.integers(0, len(views), n)
    return pd.DataFrame(
        {
            "sop_instance_uid": [f"1.2.826.0.1.{i}" for i in range(n)],
            "study_instance_uid": [f"1.2.826.0.2.{i // 2}" for i in range(n)],
            "patient_id_hash": [f"p{p}" for p in rng.integers(0, patients, n)],
            "study_date": [date(2014, 1, 1) + timedelta(days=int(d)) for d in rng.integers(0, 3000, n)],
            "status": np.where(rng.random(n) < 0.9, "ok", "unmapped"),
            "label_7": [views[i].label_7 for i in view],
            "label_30": [views[i].label_30 for i in view],
            "label_68": [views[i].label_68 for i in view],
        }
    )


def test_splits_are_patient_disjoint_and_validation_is_after_the_reference_date():
    selected, report = balance(synthetic_catalog(), BalanceConfig(granularity=7, per_class=300, seed=3))
    patients = {
        s: set(selected.loc[selected["split"] == s, "patient_id_hash"]) for s in ("train", "finetune", "val")
    }
    assert not patients["train"] & patients["finetune"]
    assert not patients["train"] & patients["val"]
    assert not patients["finetune"] & patients["val"]
    val_dates = selected.loc[selected["split"] == "val", "study_date"]
    assert val_dates.min() >= date(2018, 7, 1)
    assert selected.loc[selected["split"] != "val", "study_date"].max() < date(2018, 7, 1)
    assert (selected["status"] == "ok").all()
    assert report.dropped_straddling > 0  # this catalog has patients on both sides of the date


def test_classes_are_balanced_to_per_class_with_a_ten_percent_finetune_share():
    selected, report = balance(synthetic_catalog(), BalanceConfig(granularity=7, per_class=150, seed=3))
    train = selected[selected["split"] == "train"]["label_7"].value_counts()
    finetune = selected[selected["split"] == "finetune"]["label_7"].value_counts()
    assert set(train.index) == set(load_taxonomy().classes(7))
    assert (train + finetune == 150).all()
    assert (finetune == 15).all()
    assert not report.shortfall
    assert report.counts["train"] == train.to_dict()


def test_deterministic_for_a_seed_and_independent_of_row_order():
    catalog = synthetic_catalog()
    config = BalanceConfig(granularity=30, per_class=40, seed=7)
    first, _ = balance(catalog, config)
    shuffled, _ = balance(catalog.sample(frac=1, random_state=1), config)
    other_seed, _ = balance(catalog, BalanceConfig(granularity=30, per_class=40, seed=8))
    assert first["sop_instance_uid"].tolist() == shuffled["sop_instance_uid"].tolist()
    assert set(first["sop_instance_uid"]) != set(other_seed["sop_instance_uid"])


def test_short_classes_follow_the_policy():
    catalog = synthetic_catalog(n=3000)
    with pytest.raises(BalanceError, match="fewer than 100000"):
        balance(catalog, BalanceConfig(granularity=68, per_class=100000, short_class_policy="error"))
    kept, report = balance(
        catalog, BalanceConfig(granularity=68, per_class=100000, short_class_policy="keep")
    )
    assert len(report.shortfall) == 68
    train_and_ft = kept[kept["split"] != "val"]
    assert len(train_and_ft) == sum(report.available.values())  # keep: everything it has
    ft_share = (kept["split"] == "finetune").sum() / len(train_and_ft)
    assert 0.05 < ft_share < 0.2  # a short class gives fine-tuning ~10% of its stock, not all of it
    dropped, report = balance(catalog, BalanceConfig(granularity=68, per_class=60, short_class_policy="drop"))
    assert report.dropped_classes and not set(report.dropped_classes) & set(dropped["label_68"])


def test_rows_without_patient_id_or_date_are_handled():
    catalog = synthetic_catalog(n=2000)
    catalog.loc[:99, "patient_id_hash"] = None
    catalog.loc[100:149, "study_date"] = None
    selected, report = balance(catalog, BalanceConfig(granularity=7, per_class=10_000))
    assert report.undated == int(((catalog["status"] == "ok") & catalog["study_date"].isna()).sum())
    assert selected.loc[selected["study_date"].isna(), "split"].ne("val").all()


def test_bad_config_says_how_to_fix():
    with pytest.raises(BalanceError, match="granularity must be 7, 30 or 68"):
        BalanceConfig(granularity=10)
    with pytest.raises(BalanceError, match="finetune_fraction"):
        BalanceConfig(finetune_fraction=1.5)
    assert BalanceConfig(granularity=30).per_class == 2300
    with pytest.raises(BalanceError, match="no usable rows"):
        balance(synthetic_catalog().assign(status="unmapped"), BalanceConfig())


def test_empty_splits_give_an_empty_selection_and_no_rows_a_clear_error():
    with pytest.raises(BalanceError, match="no usable rows"):
        balance(synthetic_catalog(n=0, patients=10), BalanceConfig(per_class=5))
    catalog = synthetic_catalog(n=40, patients=10)
    # Everything before the reference date and no fine-tuning share: val and finetune are empty.
    config = BalanceConfig(per_class=5, finetune_fraction=0.0, reference_date=date(2030, 1, 1))
    selected, report = balance(catalog, config)
    assert set(selected["split"]) <= {"train"}
    assert sum(report.counts["val"].values()) == 0 and sum(report.counts["finetune"].values()) == 0
