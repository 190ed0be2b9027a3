import numpy as np
import pandas as pd

from common.vocab import Vocabulary
from preprocessing.labels import read_human_labels, read_tuning_labels


def vocab(n=6):
    return Vocabulary([f"/m/{i:02d}" for i in range(n)], [f"class {i}" for i in range(n)])


def test_grouping_matches_a_literal_reading_on_random_rows(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"{i:016x}" for i in rng.integers(0, 2**40, 300)]
    rows = pd.DataFrame({"ImageID": rng.choice(ids, 3000), "Source": "verification",
                         "LabelName": [f"/m/{k:02d}" for k in rng.integers(0, 9, 3000)],  # 6..8 unknown
                         "Confidence": rng.choice(["0", "1"], 3000)})
    rows.to_csv(tmp_path / "l.csv", index=False)
    v = vocab()
    table, problems = read_human_labels(tmp_path / "l.csv", v)
    expected: dict[str, set] = {}
    for r in rows.itertuples():
        if r.Confidence == "1" and r.LabelName in v.index:
            expected.setdefault(r.ImageID, set()).add(v.index[r.LabelName])
    assert list(table.image_ids) == sorted(expected)
    for i, image_id in enumerate(table.image_ids):
        assert table.labels(i).tolist() == sorted(expected[image_id])
    assert problems.unknown_code_rows == int(((rows.Confidence == "1") & rows.LabelName.isin(
        ["/m/06", "/m/07", "/m/08"])).sum())
    assert set(problems.no_label_ids) == set(rows.ImageID) - set(expected)
    assert problems.positive_rows == int((rows.Confidence == "1").sum())
    assert problems.negative_rows == int((rows.Confidence == "0").sum())


def test_malformed_rows_are_reported_with_their_line_numbers(tmp_path):
    (tmp_path / "l.csv").write_text(
        "ImageID,Source,LabelName,Confidence\n"
        "aaa,v,/m/01,1\n"          # line 2
        "bbb,v,/m/01,1,extra\n"    # line 3: too many fields
        "ccc,v\n"                  # line 4: too few
        "ddd,v,/m/02,yes\n"        # line 5: bad confidence
        "../up,v,/m/02,1\n"        # line 6: bad id
        "eee,v,/m/02,1\n")
    table, problems = read_human_labels(tmp_path / "l.csv", vocab())
    assert [line for line, _ in problems.malformed_rows] == [3, 4, 5]
    assert "expected 4 fields" in problems.malformed_rows[0][1]
    assert problems.bad_ids == ["../up"]
    assert list(table.image_ids) == ["aaa", "eee"]


def test_tuning_labels_without_header(tmp_path):
    (tmp_path / "t.csv").write_text("id1,/m/01 /m/03\nid2,/m/99\nbroken\nid3,/m/00\n")
    table, problems = read_tuning_labels(tmp_path / "t.csv", vocab())
    assert list(table.image_ids) == ["id1", "id3"]
    assert table.labels(0).tolist() == [1, 3]
    assert problems.no_label_ids == ["id2"]
    assert problems.malformed_rows[0][0] == 3
