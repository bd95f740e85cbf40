"""Data layer: MMSA pickles (local and S3), the Parquet format, synthetic data and the CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import re
from pathlib import Path

import boto3
import numpy as np
import pytest

from imder_sweep.data import (
    SPLITS,
    DataError,
    DataFormatError,
    DataNotFoundError,
    DimsMismatchError,
    MultimodalDataset,
    PickleNotAllowed,
    load_dataset,
    make_dataset,
    make_split,
    make_synthetic,
    read_mmsa_pickle,
    read_parquet_dataset,
    storage,
    write_mmsa_pickle,
    write_parquet_dataset,
)
from imder_sweep.data import dataset as dataset_module
from imder_sweep.data.__main__ import main
from imder_sweep.modalities import MODALITIES

SCALE = 0.05  # 64 / 11 / 34 samples: MOSI shapes, fast


@pytest.fixture(scope="module")
def small() -> MultimodalDataset:
    return make_synthetic("mosi", scale=SCALE, seed=0)


@pytest.fixture(scope="module")
def mmsa_file(small: MultimodalDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`small` in the exact MMSA aligned_50.pkl layout, with -inf in the audio."""
    path = tmp_path_factory.mktemp("mmsa") / "aligned_50.pkl"
    write_mmsa_pickle(small, str(path), audio_neg_inf=0.05, seed=1)
    return path


def _raw_pickle(path: Path) -> dict:
    with path.open("rb") as f:
        return pickle.load(f)


def _assert_bit_identical(x: MultimodalDataset, y: MultimodalDataset) -> None:
    assert (x.name, x.dims, x.seq_len, x.checksum) == (y.name, y.dims, y.seq_len, y.checksum)
    assert list(y.splits) == list(SPLITS)
    for name in SPLITS:
        a, b = x.splits[name], y.splits[name]
        assert a.ids.tolist() == b.ids.tolist()
        assert a.raw_text.tolist() == b.raw_text.tolist()
        for field in ("labels", *MODALITIES):
            left, right = getattr(a, field), getattr(b, field)
            assert left.dtype == right.dtype == np.float32
            assert left.shape == right.shape
            assert left.tobytes() == right.tobytes(), (name, field)


def _tricky_dataset() -> MultimodalDataset:
    """Edge values a lossy format would change: -0.0, subnormals, extremes, unicode, empty text."""
    rng = np.random.default_rng(5)
    splits = {}
    for i, name in enumerate(SPLITS):
        n = 3 + i
        feats = [rng.standard_normal((n, 4, d)).astype(np.float32) for d in (6, 2, 3)]
        feats[0][0, 0, :3] = [-0.0, np.float32(1e-45), np.finfo(np.float32).max]
        splits[name] = make_split(
            ids=np.array([f"vid{j}$_${j}" for j in range(n)], dtype=object),
            raw_text=np.array(['naïve 😀 "quoted", ok', "", *["x" * j for j in range(n - 2)]]),
            labels=np.linspace(-3, 3, n, dtype=np.float32),
            l=feats[0],
            a=feats[1],
            v=feats[2],
            source="tricky",
            split=name,
        )
    return make_dataset(name="tricky", splits=splits, checksum="0" * 64, source="tricky")


# MMSA pickle reader -----------------------------------------------------------------------


def test_written_pickle_has_the_mmsa_layout(mmsa_file: Path, small: MultimodalDataset) -> None:
    raw = _raw_pickle(mmsa_file)
    assert list(raw) == ["train", "valid", "test"]
    split = raw["train"]
    assert list(split) == [
        "text",
        "text_bert",
        "audio",
        "vision",
        "regression_labels",
        "classification_labels",
        "id",
        "raw_text",
        "annotations",
    ]
    n = len(small.splits["train"])
    assert split["text"].shape == (n, 50, 768) and split["text"].dtype == np.float32
    assert split["text_bert"].shape == (n, 3, 50)
    assert split["audio"].shape == (n, 50, 5) and np.isneginf(split["audio"]).any()
    assert split["vision"].shape == (n, 50, 20)
    assert split["id"].dtype == object and isinstance(split["id"][0], str)
    assert split["raw_text"].dtype == object and "$_$" in split["id"][0]
    assert not any(key.endswith("_lengths") for key in split)


@pytest.mark.parametrize("protocol", [2, 4])
def test_read_mmsa_pickle_from_disk(
    small: MultimodalDataset, tmp_path: Path, protocol: int
) -> None:
    # Protocol 2 exercises the unpickler's readline path (GLOBAL opcodes), 4 the framed one.
    path = tmp_path / "aligned_50.pkl"
    write_mmsa_pickle(small, str(path), audio_neg_inf=0.05, seed=1, protocol=protocol)
    raw = _raw_pickle(path)
    ds = read_mmsa_pickle(str(path), allow_pickle=True, expected_dims=(768, 5, 20))

    assert ds.name == "aligned_50"
    assert ds.checksum == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (ds.dims, ds.seq_len, ds.sizes) == (small.dims, 50, small.sizes)
    for name in SPLITS:
        got, want, src = ds.splits[name], small.splits[name], raw[name]
        assert got.ids.dtype.kind == got.raw_text.dtype.kind == "U"
        assert got.ids.tolist() == want.ids.tolist()
        assert got.raw_text.tolist() == want.raw_text.tolist()
        np.testing.assert_array_equal(got.labels, want.labels)
        np.testing.assert_array_equal(got.l, want.l)
        np.testing.assert_array_equal(got.v, want.v)
        # -inf (COVAREP) became 0, everything else is untouched.
        neg_inf = np.isneginf(src["audio"])
        np.testing.assert_array_equal(got.a, np.where(neg_inf, 0, want.a))
        assert all(getattr(got, f).dtype == np.float32 for f in ("labels", *MODALITIES))
        assert not got.a.flags.writeable  # shared across trials: nobody may edit it in place
        assert len(got) == len(want) and got.features("a") is got.a


def test_pickle_refused_without_opt_in(tmp_path: Path, mmsa_file: Path) -> None:
    for source in (str(mmsa_file), str(tmp_path / "not-even-there.pkl")):
        # Refused before any byte is read, so even a missing file says "opt in" first.
        with pytest.raises(PickleNotAllowed) as info:
            load_dataset(source)
        message = str(info.value)
        assert source in message
        assert "execute code" in message
        assert "--allow-pickle" in message and "data.allow_pickle: true" in message
        assert "python -m imder_sweep.data convert" in message


def test_read_mmsa_pickle_from_s3(s3_bucket: str, mmsa_file: Path) -> None:
    key = "MOSI/Processed/aligned_50.pkl"
    boto3.client("s3").upload_file(str(mmsa_file), s3_bucket, key)
    uri = f"s3://{s3_bucket}/{key}"

    from_s3 = load_dataset(uri, allow_pickle=True, expected_dims=(768, 5, 20))
    from_disk = load_dataset(str(mmsa_file), allow_pickle=True)
    _assert_bit_identical(from_disk, from_s3)
    assert from_s3.checksum == hashlib.sha256(mmsa_file.read_bytes()).hexdigest()


def test_explicit_endpoint_url(
    s3_bucket: str, mmsa_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"s3://{s3_bucket}/aligned_50.pkl"
    boto3.client("s3").upload_file(str(mmsa_file), s3_bucket, "aligned_50.pkl")
    endpoint = storage.s3_client().meta.endpoint_url
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    ds = load_dataset(uri, allow_pickle=True, endpoint_url=endpoint)
    assert ds.checksum == hashlib.sha256(mmsa_file.read_bytes()).hexdigest()


def test_s3_client_retries_in_standard_mode() -> None:
    retries = storage.s3_client(endpoint_url="http://127.0.0.1:1").meta.config.retries
    # total_max_attempts counts the first request too (the config's max_attempts would not).
    assert retries == {"mode": "standard", "total_max_attempts": storage.S3_MAX_ATTEMPTS}


def test_s3_download_resumes_after_a_broken_stream() -> None:
    from botocore.exceptions import ResponseStreamingError

    payload = bytes(range(256)) * 64

    class Body:
        def __init__(self, data: bytes, fail_after: int | None) -> None:
            self.data, self.pos, self.fail_after = data, 0, fail_after

        def read(self, n: int) -> bytes:
            if self.fail_after is not None and self.pos >= self.fail_after:
                raise ResponseStreamingError(error="connection reset")
            chunk = self.data[self.pos : self.pos + min(n, 1000)]
            self.pos += len(chunk)
            return chunk

        def close(self) -> None:
            pass

    class Client:
        def __init__(self) -> None:
            self.calls: list[dict] = []

        def get_object(self, **kwargs: str) -> dict:
            self.calls.append(kwargs)
            start = int(kwargs["Range"][6:-1]) if "Range" in kwargs else 0
            body = Body(payload[start:], fail_after=3000 if not start else None)
            return {"Body": body, "ETag": '"e1"', "ContentLength": len(payload) - start}

    client = Client()
    with storage._S3RawReader(client, "s3://b/k") as raw:
        data = bytearray()
        while chunk := raw.read(4096):
            data += chunk
    assert bytes(data) == payload
    assert client.calls[1] == {"Bucket": "b", "Key": "k", "Range": "bytes=3000-", "IfMatch": '"e1"'}


# Parquet format ---------------------------------------------------------------------------


def test_convert_round_trip_local(mmsa_file: Path, tmp_path: Path) -> None:
    original = read_mmsa_pickle(str(mmsa_file), allow_pickle=True)
    write_parquet_dataset(original, str(tmp_path / "mosi"))
    assert sorted(p.name for p in (tmp_path / "mosi").iterdir()) == [
        "metadata.json",
        "test.parquet",
        "train.parquet",
        "valid.parquet",
    ]
    copy = load_dataset(str(tmp_path / "mosi"), expected_dims=(768, 5, 20))
    _assert_bit_identical(original, copy)
    assert not copy.splits["train"].l.flags.writeable

    tricky = _tricky_dataset()
    write_parquet_dataset(tricky, str(tmp_path / "tricky"))
    _assert_bit_identical(tricky, read_parquet_dataset(str(tmp_path / "tricky")))


def test_convert_round_trip_s3(s3_bucket: str, mmsa_file: Path) -> None:
    pkl_uri = f"s3://{s3_bucket}/raw/aligned_50.pkl"
    dst = f"s3://{s3_bucket}/datasets/mosi"
    boto3.client("s3").upload_file(str(mmsa_file), s3_bucket, "raw/aligned_50.pkl")
    assert main(["convert", pkl_uri, dst, "--allow-pickle"]) == 0
    assert storage.list_files(dst) == sorted(
        ["metadata.json", "train.parquet", "valid.parquet", "test.parquet"]
    )
    original = load_dataset(str(mmsa_file), allow_pickle=True)
    _assert_bit_identical(original, load_dataset(dst))

    tricky = _tricky_dataset()
    write_parquet_dataset(tricky, f"s3://{s3_bucket}/tricky/")
    _assert_bit_identical(tricky, read_parquet_dataset(f"s3://{s3_bucket}/tricky"))


def test_parquet_refuses_to_overwrite(small: MultimodalDataset, tmp_path: Path) -> None:
    write_parquet_dataset(small, str(tmp_path))
    with pytest.raises(DataError, match="already holds a dataset"):
        write_parquet_dataset(small, str(tmp_path))
    write_parquet_dataset(small, str(tmp_path), overwrite=True)


def test_missing_parquet_split(small: MultimodalDataset, tmp_path: Path, s3_bucket: str) -> None:
    write_parquet_dataset(small, str(tmp_path))
    (tmp_path / "valid.parquet").unlink()
    with pytest.raises(DataNotFoundError) as info:
        load_dataset(str(tmp_path))
    assert "'valid'" in str(info.value) and str(tmp_path / "valid.parquet") in str(info.value)

    prefix = f"s3://{s3_bucket}/ds"
    write_parquet_dataset(small, prefix)
    boto3.client("s3").delete_object(Bucket=s3_bucket, Key="ds/test.parquet")
    with pytest.raises(DataNotFoundError) as info:
        load_dataset(prefix)
    assert "'test'" in str(info.value) and f"{prefix}/test.parquet" in str(info.value)


def test_corrupt_parquet_file(small: MultimodalDataset, tmp_path: Path) -> None:
    write_parquet_dataset(small, str(tmp_path))
    (tmp_path / "train.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataFormatError, match=r"train\.parquet"):
        load_dataset(str(tmp_path))
    meta = tmp_path / "metadata.json"
    meta.write_text(meta.read_text().replace('"seq_len": 50', '"seq_len": "50"'))
    with pytest.raises(DataFormatError, match=r"metadata\.json: dims .* malformed"):
        load_dataset(str(tmp_path))


# Errors -----------------------------------------------------------------------------------


def _write_raw(path: Path, payload: object) -> str:
    path.write_bytes(pickle.dumps(payload, protocol=4))
    return str(path)


def test_corrupt_and_truncated_pickles(mmsa_file: Path, tmp_path: Path) -> None:
    data = mmsa_file.read_bytes()
    cases = {
        "truncated.pkl": data[: len(data) // 2],
        "garbage.pkl": b"\x80\x04this is not a pickle at all" * 10,
        "empty.pkl": b"",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataFormatError) as info:
            load_dataset(str(path), allow_pickle=True)
        assert str(path) in str(info.value) and "pickle" in str(info.value)

    wrong = _write_raw(tmp_path / "list.pkl", [1, 2, 3])
    with pytest.raises(DataFormatError, match="holds a list"):
        load_dataset(wrong, allow_pickle=True)


def test_wrong_dims(mmsa_file: Path, tmp_path: Path) -> None:
    with pytest.raises(DimsMismatchError) as info:
        load_dataset(str(mmsa_file), allow_pickle=True, expected_dims=(768, 74, 35))
    message = str(info.value)
    assert str(mmsa_file) in message and "'train'" in message and "'audio'" in message
    assert "(64, 50, 5)" in message

    with pytest.raises(DimsMismatchError, match="synthetic:mosei"):
        load_dataset("synthetic:mosei?scale=0.001", expected_dims=(768, 5, 20))


def test_malformed_splits(mmsa_file: Path, tmp_path: Path) -> None:
    def broken(edit: object) -> tuple[str, str]:
        raw = _raw_pickle(mmsa_file)
        edit(raw)  # type: ignore[operator]
        path = _write_raw(tmp_path / "broken.pkl", raw)
        with pytest.raises(DataFormatError) as info:
            load_dataset(path, allow_pickle=True)
        return path, str(info.value)

    path, message = broken(lambda raw: raw.pop("valid"))
    assert path in message and "'valid'" in message and "missing split" in message

    path, message = broken(lambda raw: raw["test"].pop("vision"))
    assert path in message and "'test'" in message and "'vision'" in message

    def bad_label(raw: dict) -> None:
        raw["train"]["regression_labels"][3] = 3.5

    path, message = broken(bad_label)
    assert path in message and "'regression_labels'" in message and "3.5" in message

    def wider_audio(raw: dict) -> None:
        raw["test"]["audio"] = np.zeros((34, 50, 6), np.float32)

    path, message = broken(wider_audio)
    assert path in message and "'test'" in message and "'audio'" in message
    assert "(34, 50, 6)" in message

    def unaligned(raw: dict) -> None:
        raw["valid"]["audio"] = np.zeros((11, 375, 5), np.float32)

    path, message = broken(unaligned)
    assert "'valid'" in message and "(11, 375, 5)" in message and "aligned" in message


def _with_split(dataset: MultimodalDataset, split: str, **arrays: np.ndarray) -> MultimodalDataset:
    """`dataset` with arrays of one split replaced, past the checks of make_split (what a file
    written by another tool may hold)."""
    changed = dataclasses.replace(dataset.splits[split], **arrays)
    return dataclasses.replace(dataset, splits={**dataset.splits, split: changed})


def test_empty_split_is_refused_at_load(
    small: MultimodalDataset, mmsa_file: Path, tmp_path: Path
) -> None:
    raw = _raw_pickle(mmsa_file)
    raw["valid"] = {key: value[:0] for key, value in raw["valid"].items()}
    path = _write_raw(tmp_path / "empty-valid.pkl", raw)
    with pytest.raises(DataFormatError, match=re.escape(f"{path}: split 'valid' has no samples")):
        load_dataset(path, allow_pickle=True)
    test = small.splits["test"]
    empty = {key: getattr(test, key)[:0] for key in ("ids", "raw_text", "labels", *MODALITIES)}
    write_parquet_dataset(_with_split(small, "test", **empty), str(tmp_path / "empty-test"))
    uri = tmp_path / "empty-test" / "test.parquet"
    with pytest.raises(DataFormatError, match=re.escape(f"{uri}: split 'test' has no samples")):
        load_dataset(str(tmp_path / "empty-test"))


def test_labels_all_zero(small: MultimodalDataset, tmp_path: Path) -> None:
    """Refused for valid and test, which Acc2 and F1 are computed on (only non-zero labels
    count); accepted for train, whose L1 loss is defined for any labels."""
    for split in ("valid", "test"):
        zeros = np.zeros_like(small.splits[split].labels)
        write_parquet_dataset(_with_split(small, split, labels=zeros), str(tmp_path / split))
        with pytest.raises(DataFormatError) as info:
            load_dataset(str(tmp_path / split))
        assert str(info.value).startswith(f"{tmp_path / split / split}.parquet: split {split!r}")
        assert "key 'label'" in str(info.value) and "labels are exactly 0" in str(info.value)
    zeros = np.zeros_like(small.splits["train"].labels)
    write_parquet_dataset(_with_split(small, "train", labels=zeros), str(tmp_path / "train"))
    assert not load_dataset(str(tmp_path / "train")).splits["train"].labels.any()
    one = np.zeros_like(small.splits["test"].labels)
    one[-1] = -0.2  # a single non-zero label is enough to score
    write_parquet_dataset(_with_split(small, "test", labels=one), str(tmp_path / "one"))
    assert load_dataset(str(tmp_path / "one")).sizes == small.sizes


def test_missing_sources(tmp_path: Path, s3_bucket: str) -> None:
    missing = str(tmp_path / "nope" / "aligned_50.pkl")
    with pytest.raises(DataNotFoundError, match="no such file"):
        load_dataset(missing, allow_pickle=True)
    with pytest.raises(DataNotFoundError) as info:
        load_dataset(str(tmp_path / "no-dataset-here"))
    assert str(tmp_path / "no-dataset-here") in str(info.value)

    for uri in ("s3://no-such-bucket-imder/MOSI/aligned_50.pkl", "s3://no-such-bucket-imder/ds"):
        with pytest.raises(DataNotFoundError) as info:
            load_dataset(uri, allow_pickle=True)
        assert uri in str(info.value) and "'no-such-bucket-imder' does not exist" in str(info.value)

    uri = f"s3://{s3_bucket}/MOSI/aligned_50.pkl"
    with pytest.raises(DataNotFoundError) as info:
        load_dataset(uri, allow_pickle=True)
    assert uri in str(info.value) and "'MOSI/aligned_50.pkl'" in str(info.value)


def test_unknown_sources(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"gs://b/mosi\.pkl: unsupported scheme 'gs'"):
        load_dataset("gs://b/mosi.pkl", allow_pickle=True)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(DataFormatError, match="unknown dataset format"):
        load_dataset(str(notes))
    with pytest.raises(DataFormatError, match=r"metadata\.json"):
        load_dataset(str(tmp_path))
    with pytest.raises(DataError, match="unknown synthetic preset 'iemocap'"):
        load_dataset("synthetic:iemocap")
    with pytest.raises(DataError, match="unknown parameter 'scael'"):
        load_dataset("synthetic:mosi?scael=0.1")


# Synthetic data ---------------------------------------------------------------------------


def _all_bytes(ds: MultimodalDataset) -> bytes:
    parts = []
    for split in ds.splits.values():
        parts += [getattr(split, f).tobytes() for f in ("ids", "raw_text", "labels", *MODALITIES)]
    return b"".join(parts)


def test_synthetic_is_deterministic(small: MultimodalDataset) -> None:
    again = make_synthetic("mosi", scale=SCALE, seed=0)
    assert _all_bytes(again) == _all_bytes(small) and again.checksum == small.checksum
    other = make_synthetic("mosi", scale=SCALE, seed=1)
    assert not np.array_equal(other.splits["train"].l, small.splits["train"].l)
    assert other.checksum != small.checksum
    via_source = load_dataset("synthetic:mosi?scale=0.05&seed=1")
    assert _all_bytes(via_source) == _all_bytes(other)


def test_synthetic_shapes_and_labels() -> None:
    mosi = make_synthetic("mosi", scale=0.1)
    assert mosi.name == "synthetic-mosi" and mosi.dims == (768, 5, 20) and mosi.seq_len == 50
    assert mosi.sizes == {"train": 128, "valid": 23, "test": 69}
    mosei = make_synthetic("mosei", scale=0.01, seq_len=20)
    assert mosei.dims == (768, 74, 35) and mosei.seq_len == 20
    assert mosei.sizes == {"train": 163, "valid": 19, "test": 47}
    assert make_synthetic("mosi", scale=1e-6).sizes == {"train": 8, "valid": 8, "test": 8}

    labels = np.concatenate([s.labels for s in mosi.splits.values()])
    assert labels.dtype == np.float32 and labels.min() >= -3 and labels.max() <= 3
    assert (labels == 0).any()  # neutral samples, which Acc2 drops
    assert not np.signbit(labels[labels == 0]).any()  # no -0.0
    assert set(np.round(labels).astype(int)) == set(range(-3, 4))
    for split in mosi.splits.values():
        for m in MODALITIES:
            assert split.features(m).dtype == np.float32 and np.isfinite(split.features(m)).all()


def _pooled_ridge_r2(ds: MultimodalDataset, modality: str) -> float:
    """Held-out R^2 of a ridge fit on time-pooled features of one modality."""

    def pooled(split_name: str) -> np.ndarray:
        return ds.splits[split_name].features(modality).mean(axis=1).astype(np.float64)

    x, x_test = pooled("train"), pooled("test")
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-8
    x, x_test = (x - mean) / std, (x_test - mean) / std
    y, y_test = ds.splits["train"].labels, ds.splits["test"].labels
    w = np.linalg.solve(x.T @ x + 10.0 * np.eye(x.shape[1]), x.T @ (y - y.mean()))
    residual = y_test - (x_test @ w + y.mean())
    return float(1 - (residual**2).sum() / ((y_test - y_test.mean()) ** 2).sum())


def test_synthetic_labels_are_learnable_from_each_modality() -> None:
    ds = make_synthetic("mosi", scale=0.3)
    r2 = {m: _pooled_ridge_r2(ds, m) for m in MODALITIES}
    assert all(value > 0.1 for value in r2.values()), r2
    assert r2["l"] == max(r2.values()) and r2["l"] > 0.6, r2


# Command line -----------------------------------------------------------------------------


def test_cli_inspect(
    mmsa_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["inspect", str(mmsa_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--allow-pickle" in err

    assert main(["inspect", str(mmsa_file), "--allow-pickle"]) == 0
    out = capsys.readouterr().out
    checksum = hashlib.sha256(mmsa_file.read_bytes()).hexdigest()
    assert "l=768, a=5, v=20" in out and "seq_len:  50" in out and checksum in out
    assert "published MOSI/MOSEI sha256: no" in out
    assert "train      64" in out and "   +3" in out

    # Same file, as if it were the published MOSI: recognised by its checksum.
    monkeypatch.setitem(dataset_module.PUBLISHED_SHA256, "mosi", checksum)
    assert main(["inspect", str(mmsa_file), "--allow-pickle"]) == 0
    out = capsys.readouterr().out
    assert "name:     mosi" in out and "yes, the published MMSA MOSI" in out


def test_cli_convert_and_synth(
    mmsa_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "converted"
    assert main(["convert", str(mmsa_file), str(dst)]) == 2
    assert "--allow-pickle" in capsys.readouterr().err and not dst.exists()
    assert main(["convert", str(mmsa_file), str(dst), "--allow-pickle"]) == 0
    _assert_bit_identical(load_dataset(str(mmsa_file), allow_pickle=True), load_dataset(str(dst)))
    assert main(["convert", str(mmsa_file), str(dst), "--allow-pickle"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err

    synth_pq, synth_pkl = tmp_path / "synth", tmp_path / "synth.pkl"
    assert main(["synth", str(synth_pq), "--preset", "mosi", "--scale", "0.05"]) == 0
    args = ["synth", str(synth_pkl), "--scale", "0.05", "--format", "pickle"]
    assert main([*args, "--audio-neg-inf", "0.01"]) == 0
    _assert_bit_identical(make_synthetic("mosi", scale=SCALE), load_dataset(str(synth_pq)))
    assert np.isneginf(_raw_pickle(synth_pkl)["train"]["audio"]).any()
    assert main(["inspect", str(synth_pq)]) == 0
    assert "synthetic-mosi" in capsys.readouterr().out

    assert main(["inspect", str(tmp_path / "missing.pkl"), "--allow-pickle"]) == 2
    assert "missing.pkl: no such file" in capsys.readouterr().err
