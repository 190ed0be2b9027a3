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


def test_machine_labels_match_a_literal_reading_and_a_human_label_always_wins(tmp_path):
    from preprocessing.labels import read_machine_labels
    rng = np.random.default_rng(1)
    ids = [f"{i:016x}" for i in rng.integers(0, 2**40, 200)]
    human = pd.DataFrame({"ImageID": rng.choice(ids, 1500), "Source": "verification",
                          "LabelName": [f"/m/{k:02d}" for k in rng.integers(0, 9, 1500)],
                          "Confidence": rng.choice(["0", "1"], 1500)})
    human.to_csv(tmp_path / "h.csv", index=False)
    machine = pd.DataFrame({"ImageID": rng.choice(ids + ["ffffffffffffffff"], 4000), "Source": "machine",
                            "LabelName": [f"/m/{k:02d}" for k in rng.integers(0, 9, 4000)],
                            "Confidence": rng.choice(["0", "0.3", "0.5", "0.7", "0.9", "1.0"], 4000)})
    machine.to_csv(tmp_path / "m.csv", index=False)
    v = vocab()
    table, _ = read_human_labels(tmp_path / "h.csv", v)
    soft, problems = read_machine_labels(tmp_path / "m.csv", v, table)

    said_by_human = {(r.ImageID, r.LabelName) for r in human.itertuples()}
    expected: dict[str, dict[int, float]] = {}
    for r in machine.itertuples():
        conf = float(r.Confidence)
        if conf > 0 and r.LabelName in v.index and (r.ImageID, r.LabelName) not in said_by_human:
            mine = expected.setdefault(r.ImageID, {})
            mine[v.index[r.LabelName]] = max(conf, mine.get(v.index[r.LabelName], 0))
    for i, image_id in enumerate(table.image_ids):
        classes, confidences = soft.labels(i)
        want = expected.get(image_id, {})
        assert classes.tolist() == sorted(want), image_id
        assert np.allclose(confidences, [want[c] for c in sorted(want)])
    assert problems.notes["rows_overruled_by_a_human_label"] > 0
    assert problems.notes["rows_of_images_in_no_shard"] > 0  # ffff... and ids with no human positive
    assert problems.summary()["repeated_rows"] > 0
    kept = [len(expected.get(image_id, {})) for image_id in table.image_ids]
    assert (problems.notes["labels_kept"], problems.notes["images_with_labels"]) == (sum(kept), sum(k > 0 for k in kept))


def test_machine_labels_report_bad_rows_as_the_human_labels_do(tmp_path):
    from preprocessing.labels import read_machine_labels
    (tmp_path / "h.csv").write_text("ImageID,Source,LabelName,Confidence\naaa,v,/m/01,1\nbbb,v,/m/02,1\n")
    (tmp_path / "m.csv").write_text(
        "ImageID,Source,LabelName,Confidence\n"
        "aaa,machine,/m/03,0.8\n"     # line 2: kept
        "aaa,machine,/m/04,1.7\n"     # line 3: confidence outside [0, 1]
        "bbb,machine\n"               # line 4: too few fields
        "bbb,machine,/m/99,0.9\n"     # line 5: a class outside classes-trainable
        "bbb,machine,/m/02,0.2\n")    # line 6: the human positive wins
    table, _ = read_human_labels(tmp_path / "h.csv", vocab())
    soft, problems = read_machine_labels(tmp_path / "m.csv", vocab(), table)
    assert [line for line, _ in problems.malformed_rows] == [3, 4]
    assert problems.unknown_code_rows == 1
    assert soft.labels(0)[0].tolist() == [3] and soft.labels(1)[0].tolist() == []


def test_the_vectorised_id_check_is_plain_id():
    from common.ids import PLAIN_ID
    from preprocessing.labels import plain_ids
    rng = np.random.default_rng(3)
    alphabet = list("0aZ9_-./ \\\x00é") + ["..", "\n"]
    ids = ["", "a\x00", "\x00a"] + ["".join(rng.choice(alphabet, rng.integers(1, 6))) for _ in range(3000)]
    assert plain_ids(np.array(ids)).tolist() == [bool(PLAIN_ID.match(i)) for i in np.array(ids).tolist()]
