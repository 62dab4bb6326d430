"""Chest X-ray formats (`medvl.data.ingest_cxr`): MIMIC-CXR layout with study grouping and patient-level splits,
CheXpert and ChestX-ray14 tables, the real IU reports and the real DICOM radiograph from installed packages, and
every kind of bad input (named in rejects.jsonl, never fatal)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvl.data.corpus import iter_rows, load_manifest, shard_paths
from medvl.data.ingest import Rejected, main
from medvl.data.ingest_cxr import ImageOptions, dicom_to_uint8, iter_iu_reports, parse_report_sections

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough  // eval for pneumonia

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  The
 cardiomediastinal silhouette is normal.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


def _jpg(path: Path, value: int, size=(40, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path, "JPEG")


def _rows(corpus, split=None) -> list[dict]:
    out = []
    for sp in ([split] if split else sorted(load_manifest(corpus).splits)):
        out += list(iter_rows(shard_paths(corpus, sp)))
    return out


def _rejects(corpus) -> list[dict]:
    return [json.loads(ln) for ln in (Path(corpus) / "rejects.jsonl").read_text().splitlines()]


def write_mimic(root: Path, n_patients: int = 12) -> dict:
    """A MIMIC-CXR-JPG-shaped tree: metadata / CheXpert-labeller CSVs, files/pXX/pSUBJECT/sSTUDY/<dicom>.jpg and
    the reports files/pXX/pSUBJECT/sSTUDY.txt. Each patient has 2 studies; study 1 has PA + LATERAL (+ AP for
    even patients), study 2 one AP image. Plus the bad cases of the issue."""
    meta = ["dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns"]
    labels = ["subject_id,study_id,Atelectasis,Cardiomegaly,Edema,No Finding,Pleural Effusion"]
    expect = {}
    for p in range(n_patients):
        sub = str(10000000 + p * 1111)
        for k in (1, 2):
            stu = str(50000000 + p * 10 + k)
            views = (["LATERAL", "PA"] + (["AP"] if p % 2 == 0 else [])) if k == 1 else ["AP"]
            for j, v in enumerate(views):
                did = f"d{sub}-{k}-{j}"
                meta.append(f"{did},{sub},{stu},CHEST (PA AND LAT),{v},48,40")
                _jpg(root / "files" / f"p{sub[:2]}" / f"p{sub}" / f"s{stu}" / f"{did}.jpg", 40 * j + 20)
            rep = root / "files" / f"p{sub[:2]}" / f"p{sub}" / f"s{stu}.txt"
            rep.write_text(MIMIC_REPORT)
            labels.append(f"{sub},{stu},,1.0,-1.0,,0.0" if k == 1 else f"{sub},{stu},,,,1.0,")
            expect[f"p{sub}/s{stu}"] = views
    # bad cases: an unknown label value, a study whose only image is missing, a study with one missing image of
    # two, a report without FINDINGS/IMPRESSION, a metadata row without dicom_id
    bad = {"label": ("19000001", "59000001"), "noimg": ("19000002", "59000002"), "oneimg": ("19000003", "59000003"),
           "nosec": ("19000004", "59000004")}
    for case, (sub, stu) in bad.items():
        d = root / "files" / f"p{sub[:2]}" / f"p{sub}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"s{stu}.txt").write_text(MIMIC_REPORT if case != "nosec" else "FINAL REPORT\n WET READ: see below\n")
        meta.append(f"{case}-a,{sub},{stu},CHEST,PA,48,40")
        if case != "noimg":
            _jpg(d / f"s{stu}" / f"{case}-a.jpg", 100)
        if case == "oneimg":
            meta.append(f"{case}-b,{sub},{stu},CHEST,LATERAL,48,40")  # listed, file absent
        labels.append(f"{sub},{stu},2.0,,,," if case == "label" else f"{sub},{stu},1.0,,,,")
    meta.append(",19000005,59000005,CHEST,PA,48,40")
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text("\n".join(meta) + "\n")
    (root / "mimic-cxr-2.0.0-chexpert.csv").write_text("\n".join(labels) + "\n")
    return expect


def test_mimic_layout_groups_studies_splits_by_patient_and_names_bad_input(tmp_path):
    root = tmp_path / "mimic"
    expect = write_mimic(root)
    out = tmp_path / "corpus"
    assert main(["mimic-cxr", str(root), "--out", str(out), "--workers", "0", "--val-fraction", "0.5",
                 "--resize", "32"]) == 0
    m = load_manifest(out)
    assert m.text_kind == "report" and m.classnames[:2] == ["Atelectasis", "Cardiomegaly"]
    rows = {r["sample_id"]: r for r in _rows(out)}
    # one row per study, its images kept together: primary = PA (else AP), the others in other_images
    for sid, views in expect.items():
        r = rows[sid]
        got = [r["view"]] + [o["view"] for o in (r["other_images"] or [])]
        assert sorted(got) == sorted(views) and r["view"] == ("PA" if "PA" in views else "AP")
        assert r["patient_id"] == sid.split("/")[0] and r["study_id"] == sid.split("/")[1]
        with Image.open(__import__("io").BytesIO(r["image"])) as im:
            assert min(im.size) == 32  # --resize shrinks the short side
    two = rows[next(s for s, v in expect.items() if len(v) == 3)]
    assert len(two["other_images"]) == 2 and all(o["image"] and o["image_id"] for o in two["other_images"])
    # report sections: findings then impression
    r = rows[next(iter(expect))]
    assert r["texts"] == ["There is no focal consolidation, pleural effusion or pneumothorax. The cardiomediastinal "
                          "silhouette is normal.", "No acute cardiopulmonary process."]
    assert dict(r["labels"]) == {"Cardiomegaly": 1.0, "Edema": -1.0, "Pleural Effusion": 0.0}
    # patient-level split: both studies of every patient on one side, and both sides used
    side = {}
    for sid, row in rows.items():
        side.setdefault(row["patient_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in side.values()) and {"train", "val"} <= set.union(*side.values())
    # the study that lost one of two images is kept with the other
    assert rows["p19000003/s59000003"]["other_images"] is None
    rej = _rejects(out)
    by = {(Path(x["file"]).name, x["field"]): x for x in rej}
    assert "unknown label value '2.0'" in by[("mimic-cxr-2.0.0-chexpert.csv", "labels.Atelectasis")]["reason"]
    assert by[("mimic-cxr-2.0.0-chexpert.csv", "labels.Atelectasis")]["row"] == 2 * 12 + 2
    assert "missing image file" in by[("mimic-cxr-2.0.0-metadata.csv", "image")]["reason"]
    noimg = by[("mimic-cxr-2.0.0-metadata.csv", "images")]
    assert "p19000002/s59000002 has no readable image" in noimg["reason"]
    assert "no FINDINGS or IMPRESSION" in by[("s59000004.txt", "report")]["reason"]
    assert by[("mimic-cxr-2.0.0-metadata.csv", "dicom_id")]["reason"] == "empty id"
    assert {"p19000001/s59000001", "p19000002/s59000002", "p19000004/s59000004"}.isdisjoint(rows)
    assert m.rejected == len(rej) == 6  # label, 2 missing images, no readable image, no sections, empty id


def test_mimic_official_split_and_parallel_ingest_is_identical(ray_local, tmp_path):
    root = tmp_path / "mimic"
    expect = write_mimic(root, n_patients=6)
    split = ["dicom_id,study_id,subject_id,split"] + [
        f"x,{sid.split('/s')[1]},{sid.split('/')[0][1:]},{'validate' if i % 3 == 0 else 'train'}"
        for i, sid in enumerate(expect)]
    (root / "mimic-cxr-2.0.0-split.csv").write_text("\n".join(split) + "\n")
    a = main(["mimic-cxr", str(root), "--out", str(tmp_path / "a"), "--workers", "0", "--resize", "0"])
    b = main(["mimic-cxr", str(root), "--out", str(tmp_path / "b"), "--workers", "2", "--chunk", "3",
              "--resize", "0"])
    assert a == b == 0
    ra, rb = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert ra == rb and len(ra) == len(expect) + 1  # 1 surviving bad-case study (one image of two)
    official = {sid: ("val" if i % 3 == 0 else "train") for i, sid in enumerate(expect)}
    assert all(r["split"] == official[r["sample_id"]] for r in ra if r["sample_id"] in official)


def test_chexpert_train_csv(tmp_path):
    root = tmp_path / "data"
    base = "CheXpert-v1.0-small/train"
    lines = ["Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,Edema,Pleural Effusion"]
    rows = [("patient00001/study1/view1_frontal.jpg", "Frontal", "PA", "", "1.0", "-1.0", ""),
            ("patient00001/study1/view2_lateral.jpg", "Lateral", "", "", "1.0", "-1.0", ""),
            ("patient00001/study2/view1_frontal.jpg", "Frontal", "AP", "1.0", "", "", "0.0"),
            ("patient00002/study1/view1_frontal.jpg", "Frontal", "AP", "", "2.0", "", ""),   # unknown value
            ("patient00003/study1/view1_frontal.jpg", "Frontal", "PA", "", "", "", ""),      # no label at all
            ("patient00004/study1/view1_frontal.jpg", "Frontal", "PA", "", "0.0", "", "1.0")]  # image missing
    for i, (p, fl, appa, *lab) in enumerate(rows):
        lines.append(f"{base}/{p},F,60,{fl},{appa}," + ",".join(lab))
        if not p.startswith("patient00004"):
            _jpg(root / base / p, 30 + 40 * i)
    (root / "CheXpert-v1.0-small").mkdir(parents=True, exist_ok=True)
    csv = root / "CheXpert-v1.0-small" / "train.csv"
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "c"
    assert main(["chexpert", str(csv), "--out", str(out), "--workers", "0", "--val-fraction", "0"]) == 0
    m = load_manifest(out)
    assert m.text_kind == "labels" and m.classnames == ["No Finding", "Cardiomegaly", "Edema", "Pleural Effusion"]
    got = {r["sample_id"]: r for r in _rows(out)}
    assert set(got) == {"patient00001/study1", "patient00001/study2"}
    s1 = got["patient00001/study1"]
    assert s1["view"] == "PA" and [o["view"] for o in s1["other_images"]] == ["LATERAL"]
    assert dict(s1["labels"]) == {"Cardiomegaly": 1.0, "Edema": -1.0}
    assert s1["texts"] == ["cardiomegaly; possible edema."]
    rej = {(x["row"], x["field"]): x["reason"] for x in _rejects(out)}
    assert "unknown label value '2.0'" in rej[(5, "labels.Cardiomegaly")]
    assert "no label value" in rej[(6, "labels")]
    assert "missing image file" in rej[(7, "image")] and "no readable image" in rej[(7, "images")]


def test_chestxray14_data_entry(tmp_path):
    imgs = tmp_path / "images_001" / "images"
    lines = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position"]
    entries = [("00000001_000.png", "Cardiomegaly|Effusion", "0", "1", "PA"),
               ("00000001_001.png", "No Finding", "1", "1", "PA"),
               ("00000002_000.png", "", "0", "2", "AP"),                  # empty Finding Labels
               ("00000003_000.png", "Cardiomegaly|Foo", "0", "3", "PA"),  # unknown finding
               ("00000004_000.png", "Hernia", "0", "4", "AP"),            # image missing
               ("00000005_000.png", "Pleural_Thickening", "0", "5", "PA")]
    for name, lab, fu, pid, view in entries:
        lines.append(f"{name},{lab},{fu},{pid},50,M,{view}")
        if pid != "4":
            imgs.mkdir(parents=True, exist_ok=True)
            Image.new("L", (20, 20), 90).save(imgs / name)
    csv = tmp_path / "Data_Entry_2017.csv"
    csv.write_text("\n".join(lines) + "\n")
    (tmp_path / "test_list.txt").write_text("00000005_000.png\n")
    out = tmp_path / "x"
    assert main(["chestxray14", str(csv), "--images", str(tmp_path), "--out", str(out), "--workers", "0",
                 "--test-list", str(tmp_path / "test_list.txt")]) == 0
    got = {r["sample_id"]: r for r in _rows(out)}
    assert set(got) == {"p1/f0", "p1/f1", "p5/f0"}
    assert dict(got["p1/f0"]["labels"]) == {"Cardiomegaly": 1.0, "Pleural Effusion": 1.0}
    assert dict(got["p1/f1"]["labels"]) == {"No Finding": 1.0} and got["p1/f0"]["split"] == got["p1/f1"]["split"]
    assert got["p5/f0"]["split"] == "test" and dict(got["p5/f0"]["labels"]) == {"Pleural Thickening": 1.0}
    rej = {(x["row"], x["field"]): x["reason"] for x in _rejects(out)}
    assert rej[(4, "Finding Labels")] == "empty Finding Labels for 00000002_000.png"
    assert "unknown finding 'Foo'" in rej[(5, "Finding Labels")]
    assert "missing image file" in rej[(6, "image")]


def test_iu_reports_sections_counted_on_the_real_files():
    """The 3,955 real IU reports in torchxrayvision's wheel (read at run time, never copied): non-empty sections
    counted as offline-data.md lists them."""
    reps = list(iter_iu_reports())
    assert len(reps) == 3955 and all(not isinstance(r, tuple) for r in reps)
    count = {s: sum(s in r.sections for r in reps) for s in ("comparison", "indication", "findings", "impression")}
    assert count == {"comparison": 3333, "indication": 3865, "findings": 3425, "impression": 3921}
    assert sum(not ({"findings", "impression"} & set(r.sections)) for r in reps) == 28  # rejected by ingest
    assert sum(len(r.image_ids) for r in reps) == 7470
    assert sum("normal" in r.mesh_major for r in reps) == 1391


def test_report_section_parser():
    s = parse_report_sections(MIMIC_REPORT)
    assert s["findings"].startswith("There is no focal consolidation") and s["findings"].endswith("is normal.")
    assert s["impression"] == "No acute cardiopulmonary process."
    assert s["indication"] == "___F with cough // eval for pneumonia" and s["comparison"] == "None."
    assert parse_report_sections("FINAL REPORT\n CONCLUSION: clear lungs.") == {"impression": "clear lungs."}


def test_real_dicom_radiograph_is_inverted_8bit_and_keeps_grey_levels():
    import pydicom
    import pydicom.data
    path = pydicom.data.get_testdata_file("RG1_UNCI.dcm", download=False)
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored > 8
    raw = ds.pixel_array.astype(np.float64)
    img = dicom_to_uint8(path)
    assert img.dtype == np.uint8 and img.shape == raw.shape
    assert len(np.unique(img)) >= 200
    # MONOCHROME1: high raw values are dark, so the display image runs opposite to the raw values
    assert np.corrcoef(raw.ravel()[::97], img.ravel()[::97].astype(np.float64))[0, 1] < -0.99
    # window/level applied: the window (15000 +- 15000) maps raw 0 -> 255 and 30000 -> 0 after inversion
    assert img.max() <= 255 - round(raw.min() / 30000 * 255) + 1


def test_dicom_without_pixel_data_and_non_dicom_are_named(tmp_path):
    import pydicom.data
    with pytest.raises(Rejected) as e:
        dicom_to_uint8(pydicom.data.get_testdata_file("rtplan.dcm", download=False))
    assert e.value.field == "PixelData" and "no pixel data" in e.value.reason
    (tmp_path / "x.dcm").write_bytes(b"not a dicom")
    with pytest.raises(Rejected) as e:
        dicom_to_uint8(tmp_path / "x.dcm")
    assert e.value.field == "dicom"


def test_csv_ingest_splits_by_patient_then_study_not_by_image(tmp_path):
    lines = ["filepath\ttitle\tpatient\tstudy"]
    for i in range(40):
        Image.new("L", (8, 8), i).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png\tcaption {i}\tP{i // 4}\tS{i // 2}")
    (tmp_path / "m.tsv").write_text("\n".join(lines) + "\n")
    for key, group in (("--patient-key", 4), ("--study-key", 2)):
        col = "patient" if key == "--patient-key" else "study"
        out = tmp_path / f"c-{col}"
        assert main(["csv", str(tmp_path / "m.tsv"), "--out", str(out), key, col, "--val-fraction", "0.5"]) == 0
        sides: dict[int, set] = {}
        for r in _rows(out):
            sides.setdefault(int(r["sample_id"].split("-")[-1]) - 2, set()).add(r["split"])
        by_group: dict[int, set] = {}
        for i, s in sides.items():
            by_group.setdefault(i // group, set()).update(s)
        assert all(len(s) == 1 for s in by_group.values()) and len(set.union(*by_group.values())) == 2
    rows = _rows(tmp_path / "c-patient")
    assert {r["patient_id"] for r in rows} == {f"P{i}" for i in range(10)}


def test_image_store_uri_and_16bit_png(tmp_path):
    from medvl.data.ingest_cxr import load_image
    p = tmp_path / "wide.png"
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(p)
    data, uri = load_image(p, ImageOptions(resize=0))
    with Image.open(__import__("io").BytesIO(data)) as im:
        assert im.mode == "L" and len(np.unique(np.asarray(im))) > 200  # min-max to 8 bit, not clipped
    data, uri = load_image(p, ImageOptions(store="uri"))
    assert data is None and uri == str(p.resolve())
    with pytest.raises(Rejected, match="DICOM cannot be stored as a URI"):
        load_image(tmp_path / "a.dcm", ImageOptions(store="uri"))
