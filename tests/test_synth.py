"""Synthetic multi-domain VQA data: determinism, split separation, manifest and hash, image statistics, QA truth, CLI."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from medmoe_edge.calibration.synth import (
    DOMAINS,
    KINDS,
    MODALITY,
    NUMBER_WORDS,
    QA_PER_IMAGE,
    REGIONS,
    Domain,
    Findings,
    Sample,
    Split,
    build_dataset,
    build_split,
    caption,
    content_hash,
    has_laterality,
    image_half,
    make_qa,
    read_manifest,
    render,
    sample_findings,
)
from medmoe_edge.cli.data_cmd import make_data
from medmoe_edge.errors import ConfigError, InputError

RADIOLOGY = [d for d in DOMAINS if has_laterality(d)]
FIX = "regenerate with medmoe-edge make-data"


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict[Split, Path]]:
    root = tmp_path_factory.mktemp("synth")
    return root, build_dataset(root, seed=3, train_per_domain=3, calibration_per_domain=2, eval_per_domain=3)


def _lesion(domain: Domain, region: str, side: str, size: str, count: int) -> Findings:
    return Findings(domain, region, True, side if has_laterality(domain) else None, size, count)


def _pair(f: Findings, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The image of `f` and of the same region without a lesion, from the same seed stream (float, H×W×3)."""
    none = Findings(f.domain, f.region, False, None, None, 0)
    a = np.asarray(render(f, np.random.default_rng(seed)), np.float64)
    b = np.asarray(render(none, np.random.default_rng(seed)), np.float64)
    return a, b


def _close(mask: np.ndarray) -> np.ndarray:
    """3×3 morphological closing: mends one-pixel cracks (e.g. where a lesion's rim crosses the background level)."""

    def shift_all(m: np.ndarray, op) -> np.ndarray:
        p = np.pad(m, 1, constant_values=op is np.logical_and)
        out = p[1:-1, 1:-1].copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                out = op(out, p[1 + dy : p.shape[0] - 1 + dy, 1 + dx : p.shape[1] - 1 + dx])
        return out

    return shift_all(shift_all(mask, np.logical_or), np.logical_and)


def _components(mask: np.ndarray, min_pixels: int = 4) -> int:
    """Number of 8-connected components of at least `min_pixels` pixels, after a closing."""
    mask = _close(mask)
    seen = np.zeros_like(mask, bool)
    h, w = mask.shape
    n = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        queue.append((yy, xx))
        n += size >= min_pixels
    return n


# --- determinism and splits -------------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path):
    a = build_split(tmp_path / "a", Split.EVAL, 2, seed=5)
    b = build_split(tmp_path / "b", Split.EVAL, 2, seed=5)
    c = build_split(tmp_path / "c", Split.EVAL, 2, seed=6)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(fa) == 2 * len(DOMAINS) + 2  # images + manifest + hash
    assert fa == fb
    assert set(fa) == set(fc)
    assert sum(fa[k] != fc[k] for k in fa if k.endswith(".png")) == 2 * len(DOMAINS)
    assert a.with_suffix(".sha256").read_text() == b.with_suffix(".sha256").read_text() != c.with_suffix(".sha256").read_text()
    assert content_hash(a) == a.with_suffix(".sha256").read_text().strip()


def test_interrupted_split_leaves_no_manifest(tmp_path, monkeypatch):
    import medmoe_edge.calibration.synth.dataset as ds

    calls = []

    def failing_render(f, rng, size):
        calls.append(f)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render(f, rng, size)

    monkeypatch.setattr(ds, "render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        build_split(tmp_path, Split.EVAL, 2, seed=0)
    assert len(list((tmp_path / "images" / "eval").iterdir())) == 2
    assert not (tmp_path / "eval.jsonl").exists() and not (tmp_path / "eval.sha256").exists()


def test_splits_never_share_an_image(dataset):
    root, manifests = dataset
    pixels: dict[Split, set[str]] = {}
    for split, manifest in manifests.items():
        images = {s.image for s in read_manifest(manifest)}
        assert len(images) == {Split.TRAIN: 3, Split.CALIBRATION: 2, Split.EVAL: 3}[split] * len(DOMAINS)
        pixels[split] = {hashlib.sha256(np.asarray(Image.open(root / p)).tobytes()).hexdigest() for p in images}
        assert len(pixels[split]) == len(images)  # no duplicates within a split either
    assert not pixels[Split.TRAIN] & pixels[Split.EVAL]
    assert not pixels[Split.TRAIN] & pixels[Split.CALIBRATION]
    assert not pixels[Split.CALIBRATION] & pixels[Split.EVAL]


# --- manifest schema and hash -----------------------------------------------------------------------------------


def test_manifest_schema_round_trips(dataset):
    root, manifests = dataset
    info = json.loads((root / "dataset.json").read_text())
    assert info["seed"] == 3 and info["splits"]["eval"]["per_domain"] == 3
    for split, manifest in manifests.items():
        lines = manifest.read_text().splitlines()
        samples = read_manifest(manifest)
        assert len(samples) == len(lines)
        assert info["splits"][split.value]["sha256"] == manifest.with_suffix(".sha256").read_text().strip()
        per_image: dict[str, list[Sample]] = {}
        for line, s in zip(lines, samples):
            obj = json.loads(line)
            assert list(obj) == ["id", "image", "question", "answer", "answer_type", "domain", "findings"]
            assert Sample.from_dict(obj) == s and s.to_dict() == obj
            assert Findings.from_dict(s.findings.to_dict()) == s.findings
            m = re.fullmatch(rf"({split.value}-{s.domain.value}-\d{{5}})-q(\d+)", s.id)
            assert m, s.id
            assert s.image == f"images/{split.value}/{m.group(1)}.png"
            per_image.setdefault(s.image, []).append(s)
        for image, qs in per_image.items():
            expected = QA_PER_IMAGE[split] or len(make_qa(qs[0].findings, np.random.default_rng(0)))
            assert [q.id.rsplit("-q", 1)[1] for q in qs] == [str(i) for i in range(expected)]
            im = qs[0].open_image(root)
            assert im.mode == "RGB" and im.size == (128, 128)
            assert Image.open(root / image).mode == ("RGB" if qs[0].domain is Domain.PATHOLOGY else "L")
        assert len({(s.image, s.question) for s in samples}) == len(samples)


def test_train_has_every_question_and_eval_four(dataset):
    _, manifests = dataset
    train = read_manifest(manifests[Split.TRAIN])
    counts = {}
    for s in train:
        counts[s.image] = counts.get(s.image, 0) + 1
    for s in train:
        f = s.findings
        assert counts[s.image] == (8 if not f.lesion else 11 if f.side else 9)
    ev = read_manifest(manifests[Split.EVAL])
    assert len(ev) == 4 * 3 * len(DOMAINS)


def test_hash_catches_a_modified_and_a_missing_image(dataset, tmp_path):
    root, manifests = dataset
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    manifest = copy / manifests[Split.EVAL].name
    samples = read_manifest(manifest)
    target = copy / samples[0].image
    im = Image.open(target)
    arr = np.array(im)
    arr[0, 0] ^= 1
    Image.fromarray(arr, im.mode).save(target)
    with pytest.raises(InputError, match=r"content hash [0-9a-f]{12} does not match eval\.sha256.*regenerate with medmoe-edge make-data") as e:
        read_manifest(manifest)
    assert "\n" not in str(e.value)
    assert len(read_manifest(manifest, verify=False)) == len(samples)  # unverified read still works

    target.unlink()
    with pytest.raises(InputError, match=rf"image {re.escape(samples[0].image)} is missing: {FIX}"):
        read_manifest(manifest)

    cal = copy / manifests[Split.CALIBRATION].name
    cal.write_text(cal.read_text().replace('"answer":"yes"', '"answer":"no"', 1))
    with pytest.raises(InputError, match="does not match"):
        read_manifest(cal)
    cal.with_suffix(".sha256").unlink()
    with pytest.raises(InputError, match=rf"calibration\.sha256 not found.*{FIX}"):
        read_manifest(cal)


def test_bad_manifest_lines_are_input_errors(tmp_path):
    p = tmp_path / "eval.jsonl"
    p.write_text("{not json}\n")
    with pytest.raises(InputError, match=rf"eval\.jsonl:1: not valid JSON .*{FIX}"):
        read_manifest(p, verify=False)
    good = {"id": "x", "image": "../evil.png", "question": "q", "answer": "a", "answer_type": "open", "domain": "ct",
            "findings": {"domain": "ct", "region": "chest", "lesion": False, "side": None, "size": None, "count": 0}}
    p.write_text(json.dumps(good) + "\n")
    with pytest.raises(InputError, match="must be relative to the manifest's directory"):
        read_manifest(p, verify=False)
    with pytest.raises(InputError, match=r"manifest .*missing\.jsonl not found"):
        read_manifest(tmp_path / "missing.jsonl")


def test_findings_validate_and_sample_is_balanced():
    with pytest.raises(InputError, match="region 'brain' is not one of abdomen, chest for ct"):
        Findings(Domain.CT, "brain", False, None, None, 0)
    with pytest.raises(InputError, match="without a lesion must have count 0"):
        Findings(Domain.MRI, "brain", False, None, None, 1)
    with pytest.raises(InputError, match="pathology findings have no side"):
        Findings(Domain.PATHOLOGY, "colon", True, "left", "small", 1)
    with pytest.raises(InputError, match="lesion count must be 1-3"):
        Findings(Domain.XRAY, "chest", True, "left", "small", 4)
    with pytest.raises(InputError, match="exactly the keys"):
        Findings.from_dict({"domain": "ct"})
    assert image_half("left") == "right" and image_half("right") == "left"
    rng = np.random.default_rng(0)
    for d in DOMAINS:
        fs = [sample_findings(d, rng) for _ in range(600)]
        assert 0.42 < np.mean([f.lesion for f in fs]) < 0.58
        assert {f.region for f in fs} == set(REGIONS[d])
        assert {f.count for f in fs} == {0, 1, 2, 3}
        assert {f.side for f in fs} == ({None, "left", "right"} if has_laterality(d) else {None})
        assert all(Findings.from_dict(f.to_dict()) == f for f in fs)


# --- images -----------------------------------------------------------------------------------------------------


def test_colour_statistics_match_the_modality():
    stats = {}
    for d in DOMAINS:
        for region in REGIONS[d]:
            arrs = [np.asarray(render(_lesion(d, region, "left", "small", k) if k else Findings(d, region, False, None, None, 0),
                                      np.random.default_rng(k)), np.int32) for k in range(3)]
            for a in arrs:
                assert a.shape == (128, 128, 3)
                if d is Domain.PATHOLOGY:
                    r, g, b = a.reshape(-1, 3).mean(0)
                    assert r > g + 20 and b > g + 10 and r > 180, (region, r, g, b)  # pink/eosin-dominant
                    assert (a[..., 2] > a[..., 0]).mean() > 0.02  # some blue-purple nuclei
                else:
                    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()  # grayscale
            stats[(d, region)] = np.mean([a[..., 0].mean() for a in arrs]), np.mean([a[:8, :8, 0].mean() for a in arrs])
    for d, region in [(Domain.CT, "chest"), (Domain.CT, "abdomen"), (Domain.MRI, "brain")]:
        assert stats[(d, region)][1] < 10  # black air around the body
    assert stats[(Domain.XRAY, "chest")][0] > stats[(Domain.CT, "chest")][0] + 40  # a radiograph is mostly bright tissue


@pytest.mark.parametrize("domain", RADIOLOGY, ids=lambda d: d.value)
def test_lesion_changes_only_its_side_in_radiological_convention(domain):
    for region in REGIONS[domain]:
        for k, (side, size) in enumerate([("left", "small"), ("right", "small"), ("left", "large"), ("right", "large")]):
            a, b = _pair(_lesion(domain, region, side, size, 1), seed=10 + k)
            diff = np.abs(a - b)[..., 0]
            left, right = diff[:, :64].mean(), diff[:, 64:].mean()
            on, off = (right, left) if image_half(side) == "right" else (left, right)
            assert on > 0.3, (region, side, on)  # patient's left is on the image right
            assert off < 0.01 * on, (region, side, on, off)


@pytest.mark.parametrize("domain", DOMAINS, ids=lambda d: d.value)
def test_lesion_count_and_size_are_visible(domain):
    for region in REGIONS[domain]:
        areas = {}
        for k, (size, count) in enumerate([("small", 1), ("small", 2), ("small", 3), ("large", 1), ("large", 2), ("large", 3)]):
            f = _lesion(domain, region, "left" if k % 2 else "right", size, count)
            a, b = _pair(f, seed=100 + k)
            mask = np.abs(a - b).max(axis=2) > 20
            assert _components(mask) == count, (region, size, count)
            areas[(size, count)] = mask.sum() / count
        for c in (1, 2, 3):
            assert areas[("large", c)] > 2.0 * areas[("small", c)], (region, areas)


def test_render_sizes_and_rng_consumption():
    f = _lesion(Domain.XRAY, "chest", "left", "large", 2)
    for s in (64, 256):
        im = render(f, np.random.default_rng(0), s)
        assert im.mode == "RGB" and im.size == (s, s)
    with pytest.raises(ConfigError, match="image size must be an integer from 32 to 1024"):
        render(f, np.random.default_rng(0), 16)
    r1, r2 = np.random.default_rng(9), np.random.default_rng(9)
    render(f, r1)
    make_qa(f, r1)
    render(Findings(Domain.XRAY, "chest", False, None, None, 0), r2)
    make_qa(Findings(Domain.XRAY, "chest", False, None, None, 0), r2)
    assert r1.random() == r2.random()  # draws do not depend on the findings


def test_render_is_fast():
    rng = np.random.default_rng(0)
    fs = [sample_findings(d, rng) for _ in range(10) for d in DOMAINS]
    render(fs[0], rng)
    t = time.perf_counter()
    for f in fs:
        render(f, rng)
    per_image = (time.perf_counter() - t) / len(fs)
    assert per_image < 0.02, f"{per_image * 1000:.1f} ms per image (target < 5 ms)"


# --- language ---------------------------------------------------------------------------------------------------


def _expected(f: Findings, q: str) -> tuple[str, str]:
    """Independent re-derivation of the answer and answer type of question `q` about `f`."""
    yes = {True: "yes", False: "no"}
    nouns = {Domain.CT: "lesion", Domain.MRI: "lesion", Domain.XRAY: "nodule", Domain.PATHOLOGY: "tumour"}
    where = {"chest": "lung", "abdomen": "abdomen", "brain": "hemisphere"}.get(f.region)
    if q.startswith(("describe", "give a short description")):
        return caption(f)[:-1], "open"
    if q.startswith("how many"):
        return ["zero", "one", "two", "three"][f.count], "open"
    if q.startswith(("what abnormality", "what is abnormal", "what are the findings")):
        if not f.lesion:
            return "no abnormality", "open"
        n = nouns[f.domain] + ("s" if f.count > 1 else "")
        loc = f.region if f.domain is Domain.PATHOLOGY else f"{f.side} {where}"
        return f"{'' if f.count == 1 else ['', '', 'two ', 'three '][f.count]}{f.size} {n} in the {loc}", "open"
    if q.startswith("where"):
        return f"{f.side} {where}", "open"
    if "left or the right" in q or q.startswith("which side"):
        return f.side, "closed"
    if q.startswith(("what modality", "what imaging modality", "how was this image")):
        return {"ct": "ct", "mri": "mri", "xray": "x-ray", "pathology": "pathology"}[f.domain.value], "closed"
    if q.startswith(("which organ", "what part of the body", "what body region", "what organ", "what tissue")):
        return f.region, "closed"
    if "normal?" in q:
        return yes[not f.lesion], "closed"
    if "large?" in q or "big?" in q:
        return yes[f.size == "large"], "closed"
    if "multiple" in q or "more than one" in q:
        return yes[f.count > 1], "closed"
    if q.startswith(("is there", "are there any", "is malignancy")):
        return yes[f.lesion], "closed"
    raise AssertionError(f"unrecognised question {q!r}")


def test_every_answer_follows_from_the_findings():
    rng = np.random.default_rng(1)
    seen_kinds = set()
    answers: dict[Domain, set[str]] = {d: set() for d in DOMAINS}
    for _ in range(150):
        for d in DOMAINS:
            f = sample_findings(d, rng)
            qas = make_qa(f, rng)
            assert len(qas) == (8 if not f.lesion else 11 if f.side else 9)
            for qa in qas:
                assert (qa.answer, qa.answer_type) == _expected(f, qa.question), (f, qa)
                assert qa.question == qa.question.lower() and qa.answer == qa.answer.lower()
                answers[d].add(qa.answer)
            sub = make_qa(f, np.random.default_rng(7), limit=4)
            full = make_qa(f, np.random.default_rng(7))
            assert len(sub) == 4 and [q for q in full if q in sub] == sub  # subset, in template order
            seen_kinds.update(q.question.split()[0] for q in qas)
    cap = caption(Findings(Domain.CT, "abdomen", True, "left", "large", 2))
    assert cap == "ct scan of the abdomen with two large lesions on the left."
    assert caption(Findings(Domain.MRI, "brain", False, None, None, 0)) == "mri of the brain with no lesion."
    assert caption(Findings(Domain.XRAY, "chest", True, "right", "small", 1)) == "x-ray of the chest with a small nodule in the right lung."
    # substring-scored answers: no modality or count word is contained in another domain's answers or another count word
    for d, m in MODALITY.items():
        assert not any(m in a for other in DOMAINS if other is not d for a in answers[other]), m
    assert not any(a in b for a in NUMBER_WORDS for b in NUMBER_WORDS if a != b)
    assert len(KINDS) == 11


# --- CLI --------------------------------------------------------------------------------------------------------


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("make-data")(make_data)

    @app.callback()
    def _root() -> None:
        pass

    return app


SMALL = ["--train-per-domain", "2", "--calibration-per-domain", "1", "--eval-per-domain", "1", "--seed", "4", "--size", "64"]


def test_cli_writes_dataset_and_prints_table(tmp_path):
    out = tmp_path / "data"
    r = CliRunner().invoke(_app(), ["make-data", "--out", str(out), *SMALL])
    assert r.exit_code == 0, r.output
    for split in ("train", "calibration", "eval"):
        digest = (out / f"{split}.sha256").read_text().strip()
        assert digest[:12] in r.stdout
        samples = read_manifest(out / f"{split}.jsonl")
        assert Image.open(out / samples[0].image).size == (64, 64)
    assert r.stdout.count("pathology") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no partial build left beside it
    again = tmp_path / "again"
    again.mkdir()  # an existing empty directory is fine
    assert CliRunner().invoke(_app(), ["make-data", "--out", str(again), *SMALL]).exit_code == 0
    assert _files(out) == _files(again)


def test_cli_refuses_non_empty_out_and_bad_counts(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = CliRunner().invoke(_app(), ["make-data", "--out", str(out), *SMALL])
    assert r.exit_code == 2
    assert "already exists and is not empty: choose a new --out" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    r = CliRunner().invoke(_app(), ["make-data", "--out", str(tmp_path / "new"), "--eval-per-domain", "0"])
    assert r.exit_code == 2 and "--eval-per-domain must be at least 1, not 0" in r.output
    assert not (tmp_path / "new").exists()


def test_cli_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    import medmoe_edge.cli.data_cmd as data_cmd

    def boom(out_dir: Path, **kwargs):
        build_split(out_dir, Split.TRAIN, 1, 0, size=32)
        raise KeyboardInterrupt

    monkeypatch.setattr(data_cmd, "build_dataset", boom)
    r = CliRunner().invoke(_app(), ["make-data", "--out", str(tmp_path / "data"), *SMALL])
    assert r.exit_code == 130 and "interrupted" in r.output
    assert list(tmp_path.iterdir()) == []
