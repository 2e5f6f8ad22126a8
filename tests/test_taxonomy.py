import pytest

from ingest.dataset.taxonomy import GRANULARITIES, TaxonomyError, load_taxonomy, parse_taxonomy

HEADER = "label_68,label_30,label_7,body_part,view_position,description\n"


@pytest.fixture(scope="module")
def taxonomy():
    return load_taxonomy()


def packaged_text():
    from ingest.dataset.taxonomy import _packaged_text

    return _packaged_text()


def test_counts_are_exactly_7_30_68(taxonomy):
    assert [len(taxonomy.classes(g)) for g in GRANULARITIES] == [7, 30, 68]


def test_published_classes_present(taxonomy):
    assert set(taxonomy.classes(7)) == {
        "Head",
        "Chest",
        "Abdomen",
        "Pelvis",
        "Spine",
        "Upper_Extremity",
        "Lower_Extremity",
    }
    assert {"T_L_Spine", "Whole_Spine", "Cochlea", "Hip", "Lower_Leg"} <= set(taxonomy.classes(30))
    assert "Pelvis" not in taxonomy.classes(30)  # published list has no 30-class Pelvis (see TAXONOMY.md)


def test_parents_and_children(taxonomy):
    assert taxonomy.parents("Hand_PA") == ("Hand", "Upper_Extremity")
    assert taxonomy.parents("Pelvis_Frogleg") == ("Hip", "Pelvis")
    assert taxonomy.children("Spine") == (
        "C_Spine_AP",
        "C_Spine_Atlas",
        "C_Spine_Lateral",
        "L_Spine_AP",
        "L_Spine_Lateral",
        "L_Spine_Oblique",
        "T_L_Spine",
        "T_Spine_AP",
        "Whole_Spine_AP",
    )
    assert taxonomy.children("Spine", granularity=30) == (
        "C_Spine",
        "L_Spine",
        "T_L_Spine",
        "T_Spine",
        "Whole_Spine",
    )
    # Upper_Extremity is both a 7- and a 30-class name: the level disambiguates.
    assert taxonomy.children("Upper_Extremity", level=30) == ("Upper_Extremity_Other",)
    assert len(taxonomy.children("Upper_Extremity", level=7)) == 12
    with pytest.raises(ValueError):
        taxonomy.children("Hand", level=30, granularity=7)
    with pytest.raises(KeyError):
        taxonomy.children("Hand", level=7)


def test_every_68_class_rolls_up_consistently(taxonomy):
    for g in (30, 7):
        union = set()
        for parent in taxonomy.classes(g):
            kids = set(taxonomy.children(parent, level=g))
            assert kids, parent
            assert not kids & union  # each 68 class has exactly one parent
            union |= kids
        assert union == set(taxonomy.classes(68))


def test_index_name_round_trip(taxonomy):
    for g in GRANULARITIES:
        names = taxonomy.classes(g)
        assert list(names) == sorted(names)
        for i, name in enumerate(names):
            assert taxonomy.index(name, g) == i and taxonomy.name(i, g) == name
    with pytest.raises(IndexError):
        taxonomy.name(7, 7)
    with pytest.raises(KeyError):
        taxonomy.index("Hand_AP", 68)
    with pytest.raises(ValueError):
        taxonomy.classes(10)


def test_version_tracks_file_content():
    text = packaged_text()
    assert parse_taxonomy(text).version == load_taxonomy().version
    assert parse_taxonomy(text.replace("Rib Series", "Ribs")).version != load_taxonomy().version


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.replace("Hand_PA,Hand,", "Hand_Lateral,Hand,"), "repeats row"),
        (lambda t: t.replace("Hand_PA,Hand,Upper_Extremity", "Hand_PA,Hand,Head"), "two 7-class parents"),
        (lambda t: t.replace("Hand_Lateral,Hand,", "Hand_Lateral,Hand_Side,"), "31 30-class labels"),
        (
            lambda t: t.replace("Wrist_Oblique,Wrist,Upper_Extremity,WRIST,RLO,Wrist Oblique\n", ""),
            "67 68-class labels",
        ),
        (lambda t: t.replace("label_30", "parent_30", 1), "missing column(s) label_30"),
        (lambda t: t.replace("Zygomatic,Zygomatic,Head", "Zygomatic,,Head"), "empty label_30"),
    ],
)
def test_broken_taxonomy_is_rejected_with_a_located_message(mutate, message):
    with pytest.raises(TaxonomyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_taxonomy(mutate(packaged_text()))


def test_site_code_table_merges(tmp_path, taxonomy):
    table = tmp_path / "codes.csv"
    table.write_text("code,label_68\nXR123,Hand_PA\n  xr 9 ,Chest_Frontal\n")
    merged = taxonomy.with_code_table(table)
    assert merged.code_table == {"XR123": "Hand_PA", "XR 9": "Chest_Frontal"}
    assert merged.version != taxonomy.version and merged.version.startswith(taxonomy.version)
    assert merged.classes(68) == taxonomy.classes(68)
    assert load_taxonomy(code_table=table).code_table == merged.code_table


@pytest.mark.parametrize(
    "body, message",
    [
        ("code,label_68\nXR1,Hand_PA\nXR2,Hand_AP\n", "row 3: unknown label_68 'Hand_AP'"),
        ("code,label_68\nXR1,Hand_PA\nxr1,Hand_Lateral\n", "row 3: code 'xr1' maps to both"),
        ("code,label_68\n,Hand_PA\n", "row 2: empty code"),
        ("code,view\nXR1,Hand_PA\n", "missing column"),
    ],
)
def test_bad_code_table_names_the_row(tmp_path, taxonomy, body, message):
    table = tmp_path / "codes.csv"
    table.write_text(body)
    with pytest.raises(TaxonomyError, match=message):
        taxonomy.with_code_table(table)
