import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medvl.data.corpus import CorpusError, check_shard_schema, iter_rows, load_manifest, shard_paths, validate_corpus
from medvl.data.ingest import ingest_folder, ingest_table, main


def _png(path, value=128):
    Image.new("L", (16, 16), value).save(path)


def test_csv_ingest_rejects_bad_rows_with_reasons(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    _png(img / "ok1.png")
    _png(img / "ok2.png", 30)
    (img / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    _png(img / "notext.png")
    _png(img / "badlabel.png")
    rows = [
        {"filepath": "img/ok1.png", "title": "left lower lobe opacity", "Effusion": "1"},
        {"filepath": "img/corrupt.png", "title": "normal chest", "Effusion": "0"},
        {"filepath": "img/missing.png", "title": "cardiomegaly", "Effusion": "0"},
        {"filepath": "img/notext.png", "title": "", "Effusion": "0"},
        {"filepath": "img/badlabel.png", "title": "effusion", "Effusion": "yes"},
        {"filepath": "img/ok2.png", "title": "no acute findings", "Effusion": ""},
    ]
    tsv = tmp_path / "train.tsv"
    tsv.write_text("filepath\ttitle\tEffusion\n" + "\n".join(
        f"{r['filepath']}\t{r['title']}\t{r['Effusion']}" for r in rows) + "\n")
    m = ingest_table(str(tsv), str(tmp_path / "out"), label_keys=["Effusion"], val_fraction=0.0)
    assert m.rows() == 2 and m.rejected == 4
    rejects = [json.loads(l) for l in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    by_row = {r["row"]: r for r in rejects}
    assert by_row[3]["field"] == "filepath" and "unreadable image" in by_row[3]["reason"]
    assert by_row[4]["field"] == "filepath" and "cannot read" in by_row[4]["reason"]
    assert by_row[5]["field"] == "texts" and "empty" in by_row[5]["reason"]
    assert by_row[6]["field"] == "labels.Effusion" and "'yes'" in by_row[6]["reason"]
    assert all(r["file"] == str(tsv) for r in rejects)
    got = list(iter_rows(shard_paths(tmp_path / "out", "train")))
    assert sorted(r["texts"][0] for r in got) == ["left lower lobe opacity", "no acute findings"]
    assert dict(got[0]["labels"]) in ({"Effusion": 1.0}, {})


def test_jsonl_and_cli_summary(tmp_path, capsys):
    _png(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "report": "clear lungs", "id": "s1"}) + "\n"
                                      + "{broken json\n")
    rc = main(["csv", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "c"), "--image-key", "image",
               "--text-key", "report", "--id-key", "id", "--val-fraction", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "1 rows accepted" in out and "1 rejected" in out
    assert load_manifest(tmp_path / "c").rows("train") == 1


def test_folder_ingest_uses_prompt_templates(tmp_path):
    for cls in ("pneumonia", "normal"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(3):
            _png(tmp_path / "tree" / cls / f"{i}.png", 40 * i)
    (tmp_path / "tree" / "normal" / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    m = ingest_folder(str(tmp_path / "tree"), str(tmp_path / "c"), templates=["a chest x-ray showing {}."],
                      shard_size=2)
    assert m.rows() == 6 and m.rejected == 1 and m.classnames == ["normal", "pneumonia"]
    assert len(m.shards) >= 3  # shard size honoured
    rows = list(iter_rows(validate_corpus(tmp_path / "c", None)))
    texts = {r["texts"][0] for r in rows}
    assert texts == {"a chest x-ray showing normal.", "a chest x-ray showing pneumonia."}


def test_wrong_shard_schema_names_file_and_field(tmp_path, digits_corpus):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"sample_id": ["a"], "image": [b"x"], "texts": ["not a list"], "split": ["train"]}), bad)
    with pytest.raises(CorpusError, match=r"bad\.parquet: field 'texts' has type string"):
        check_shard_schema(bad)
    pq.write_table(pa.table({"sample_id": ["a"], "image": [b"x"]}), bad)
    with pytest.raises(CorpusError, match=r"bad\.parquet: required field 'texts' is missing"):
        check_shard_schema(bad)
    assert load_manifest(digits_corpus).rows() == 1797
