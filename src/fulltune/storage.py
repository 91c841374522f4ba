"""Storage by URI: local paths and s3://, with atomic publishing and checksums.

Large data (shards, checkpoints, models) moves between steps as URIs inside a run-scoped work
directory. Every write here is atomic for readers: locally a temp file in the same directory is
renamed into place; on S3 a PUT is atomic by nature. Multi-file outputs are published by writing
a manifest *last*; readers trust only what a manifest lists.

S3 endpoint and credentials come from the standard AWS environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, ...) — never from pipeline parameters.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

from fulltune import redact

CHUNK = 8 * 1024 * 1024


class StorageError(OSError):
    """A URI that cannot be read or written; the message names it."""


class StorageConfigError(StorageError):
    """Storage that is misconfigured rather than briefly unavailable (a bucket that does not exist,
    credentials refused or missing, the wrong region): retrying cannot help; the message says what
    to check."""


_MISSING_BUCKET = ("NoSuchBucket",)
_REFUSED = (
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "403",
)
_WRONG_REGION = (
    "PermanentRedirect",
    "AuthorizationHeaderMalformed",
    "IllegalLocationConstraintException",
    "301",
)


@contextlib.contextmanager
def s3_errors(uri: str) -> Iterator[None]:
    """botocore's failures as one clear error naming `uri`, one kind per cause: a missing bucket,
    refused or missing credentials, the wrong region, an endpoint whose TLS certificate is refused
    (StorageConfigError), an endpoint that cannot be reached or drops the connection (StorageError).
    A missing object is left to the caller (botocore's ClientError). botocore's messages quote the
    request's URL: AWS_ENDPOINT_URL's user:token@ is hidden from them."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        NoCredentialsError,
        SSLError,
    )

    bucket = uri[len("s3://") :].split("/", 1)[0]
    try:
        yield
    except ClientError as exc:
        code = _code(exc)
        if code in _MISSING_BUCKET:
            raise _missing_bucket(uri) from None
        if code in _REFUSED:
            raise StorageConfigError(
                f"{uri}: access refused ({code}): check the credentials (the S3 Secret's keys, or the pod's "
                "cloud identity) and the bucket's policy"
            ) from None
        if code in _WRONG_REGION:
            raise StorageConfigError(
                f"{uri}: the bucket {bucket!r} is in another region ({code}): set AWS_DEFAULT_REGION to it"
            ) from None
        raise
    except NoCredentialsError:
        raise StorageConfigError(
            f"{uri}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (the S3 Secret) or "
            "give the pod a cloud identity"
        ) from None
    except SSLError as exc:  # a self-signed or private CA's certificate: every retry is refused too
        raise StorageConfigError(
            f"{uri}: the S3 endpoint's TLS was refused ({redact.text(exc)}): for a private CA set "
            "AWS_CA_BUNDLE to its certificate; check that AWS_ENDPOINT_URL's scheme is the endpoint's"
        ) from None
    except (ConnectionError, HTTPClientError) as exc:  # refused, timed out, dropped: may pass
        raise StorageError(f"{uri}: cannot reach the S3 endpoint ({redact.text(exc)})") from None


def _missing_bucket(uri: str) -> StorageConfigError:
    bucket = split_s3(uri)[0]
    return StorageConfigError(
        f"{uri}: the bucket {bucket!r} does not exist (check its name, and AWS_ENDPOINT_URL for an "
        "S3-compatible store)"
    )


def _code(exc) -> str:
    """The error code of a botocore ClientError ("NoSuchKey", "404", ...)."""
    return str(exc.response.get("Error", {}).get("Code"))


@contextlib.contextmanager
def s3_object(uri: str) -> Iterator[None]:
    """`s3_errors` for a call on one object: a missing object is FileNotFoundError, any other
    refusal StorageError. A 404 is the object's only if its bucket exists: HEAD answers carry no
    error code, so the bucket is asked once more (StorageConfigError when it is the one missing)."""
    from botocore.exceptions import ClientError

    try:
        with s3_errors(uri):
            yield
    except ClientError as exc:
        code = _code(exc)
        if code not in ("NoSuchKey", "NotFound", "404"):
            raise StorageError(f"{uri}: {exc}") from exc
        require_bucket(uri)
        raise FileNotFoundError(f"{uri}: no such object ({code})") from None


def require_bucket(uri: str) -> None:
    """StorageConfigError when the bucket of `uri` does not exist or refuses these credentials;
    StorageError when it cannot be asked. A HEAD answer carries no error code: its 404 is the
    bucket's."""
    from botocore.exceptions import ClientError

    try:
        with s3_errors(uri):
            s3_client().head_bucket(Bucket=split_s3(uri)[0])
    except ClientError as exc:
        if _code(exc) in ("404", "NotFound", "NoSuchBucket"):
            raise _missing_bucket(uri) from None
        raise StorageError(f"{uri}: {exc}") from exc


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    if not is_s3(uri):
        raise StorageError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket in the URI")
    return bucket, key


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        out = base.rstrip("/")
        for part in parts:
            out = f"{out}/{part.strip('/')}"
        return out
    return str(Path(base, *parts))


def basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class S3WriteOptions:
    """How objects are written to S3.

    checksum_algorithm: the checksum S3 computes and verifies on upload (x-amz-checksum-*), also for
        each part of a multipart upload; None leaves it to the client's default.
    sse_kms_key_id: encrypt with this KMS key (SSE-KMS); None uses the bucket's default encryption.
    request_checksum_calculation: the client setting (see `s3_client`).
    """

    checksum_algorithm: str | None = None
    sse_kms_key_id: str | None = None
    request_checksum_calculation: str | None = None

    def client(self) -> Any:
        if self.request_checksum_calculation:
            return s3_client(self.request_checksum_calculation)
        return s3_client()

    def extra_args(self) -> dict[str, str]:
        args = {}
        if self.checksum_algorithm:
            args["ChecksumAlgorithm"] = self.checksum_algorithm
        if self.sse_kms_key_id:
            args["ServerSideEncryption"] = "aws:kms"
            args["SSEKMSKeyId"] = self.sse_kms_key_id
        return args


DEFAULT_WRITE = S3WriteOptions()


@lru_cache(maxsize=4)
def s3_client(request_checksum_calculation: str | None = None) -> Any:
    """A boto3 S3 client configured from the standard AWS environment variables.

    `request_checksum_calculation` ("when_supported" | "when_required") overrides the client's
    default (and AWS_REQUEST_CHECKSUM_CALCULATION): some S3-compatible stores reject the checksums
    newer clients send by default.
    """
    import boto3
    from botocore.config import Config

    kwargs: dict[str, Any] = {"retries": {"max_attempts": 5, "mode": "standard"}}
    if request_checksum_calculation:
        kwargs["request_checksum_calculation"] = request_checksum_calculation
    return boto3.client("s3", config=Config(**kwargs))


# -- reading ------------------------------------------------------------------------------------


def exists(uri: str) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            with s3_object(uri):
                s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except FileNotFoundError:
            return False
    return os.path.exists(uri)


@contextlib.contextmanager
def open_read(uri: str) -> Iterator[IO[bytes]]:
    """A binary stream over the object; not loaded whole."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with s3_object(uri):
            body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        try:
            yield body
        finally:
            body.close()
    else:
        with open(uri, "rb") as fh:
            yield fh


def read_range(uri: str, start: int, length: int) -> bytes:
    """Up to `length` bytes from offset `start` (fewer at the end of the object): on S3 one ranged
    GET, so a file's header costs one request whatever the file's size."""
    if length <= 0:
        return b""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with s3_object(uri):
            obj = s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
        with contextlib.closing(obj["Body"]) as body:
            return body.read()
    with open(uri, "rb") as fh:
        fh.seek(start)
        return fh.read(length)


def read_bytes(uri: str) -> bytes:
    with open_read(uri) as fh:
        return fh.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def list_files(prefix: str) -> list[str]:
    """Every file below `prefix` (recursive), sorted, as URIs of the same kind.

    On S3 a key ending in "/" is a folder, not a file: the S3 console's "Create folder" (and s3fs,
    Hadoop's S3A) store one as an empty object. Listed as a file, a model uploaded that way would be
    downloaded onto its own directory's name, and registered with a file named "".
    """
    if is_s3(prefix):
        return list(list_sizes(prefix))
    root = Path(prefix)
    if root.is_file():
        return [str(root)]
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def list_sizes(prefix: str) -> dict[str, int]:
    """`list_files` with each file's size in bytes, in the same order. On S3 the sizes come with the
    listing itself: sizing a folder of 10,000 objects costs ten list requests, not 10,000 HEADs."""
    if not is_s3(prefix):
        return {f: os.path.getsize(f) for f in list_files(prefix)}
    bucket, key = split_s3(prefix)
    key = key.rstrip("/") + "/" if key else ""
    out: dict[str, int] = {}
    with s3_errors(prefix):
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                if not _folder_marker(obj["Key"]):
                    out[f"s3://{bucket}/{obj['Key']}"] = int(obj["Size"])
    return dict(sorted(out.items()))


def _folder_marker(key: str) -> bool:
    """An empty object whose key ends in '/': what the S3 console's "Create folder", Hadoop's s3a
    and other tools write to show a folder. It is the folder, not a file in it."""
    return key.endswith("/")


def children(prefix: str) -> list[str]:
    """The names directly below `prefix` (files and directories; on S3 the first part of each key
    below it), sorted; empty when nothing is there."""
    if is_s3(prefix):
        base = prefix.rstrip("/") + "/"
        return sorted({f[len(base) :].split("/", 1)[0] for f in list_files(prefix)})
    return sorted(os.listdir(prefix)) if os.path.isdir(prefix) else []


_ALTERNATION = re.compile(r"\{([^{}]*,[^{}]*)\}")


def alternatives(uri: str) -> list[str]:
    """The URIs a brace alternation names, as in Hadoop and Spark paths:
    `s3://b/dt={2026-11-21,2026-11-22}/` is two prefixes; several groups give every combination."""
    m = _ALTERNATION.search(uri)
    if m is None:
        return [uri]
    return [
        alt
        for part in m.group(1).split(",")
        for alt in alternatives(uri[: m.start()] + part + uri[m.end() :])
    ]


@dataclass(frozen=True)
class Expansion:
    """What a URI names: `files` matching the patterns, `others`, the rest of a named folder's
    listing (empty for a file or a glob, which name their files themselves), `empty`, the
    alternatives of a brace alternation that named no matching file, and `hidden`, the files a
    folder or glob would have matched that lie below a name starting with '.' or '_' (not read).
    `sizes` holds the size of each listed file, from the listing (a single named file has none)."""

    files: list[str]
    others: list[str]
    empty: list[str] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)


def expand(uri: str, patterns: tuple[str, ...] = ("*",)) -> list[str]:
    """A file, a directory (its files matching `patterns`) or a glob, as a sorted list of files; a
    brace alternation (`{a,b}`) names several of them, whose files are listed in its order, each
    missing one contributing nothing."""
    return expand_all(uri, patterns).files


def expand_all(uri: str, patterns: tuple[str, ...] = ("*",)) -> Expansion:
    """expand(), keeping what a folder's one listing held beside the matching files."""
    if _ALTERNATION.search(uri):
        files: dict[str, None] = {}  # ordered, without repeats
        others: dict[str, None] = {}
        hidden: dict[str, None] = {}
        empty: list[str] = []
        sizes: dict[str, int] = {}
        for alt in alternatives(uri):
            try:
                found = expand_all(alt, patterns)
            except FileNotFoundError:
                found = Expansion([], [])
            if not found.files:
                empty.append(alt)
            files.update(dict.fromkeys(found.files))
            others.update(dict.fromkeys(found.others))
            hidden.update(dict.fromkeys(found.hidden))
            sizes.update(found.sizes)
        return Expansion(list(files), [f for f in others if f not in files], empty, list(hidden), sizes)
    has_glob = any(ch in uri for ch in "*?[") and not _named_literally(uri)
    if has_glob:
        base = uri
        while any(ch in basename(base) for ch in "*?[") or any(ch in base for ch in "*?["):
            base = base.rsplit("/", 1)[0]
            if "/" not in base:
                break
        listed = list_sizes(base)
        matched = sorted(f for f in listed if fnmatch.fnmatch(f, uri))
        return _without_hidden(base, matched, [], listed)
    if _names_a_file(uri):
        return Expansion([uri], [])
    listing = list_sizes(uri)
    matched = [f for f in listing if any(fnmatch.fnmatch(basename(f), p) for p in patterns)]
    taken = set(matched)
    return _without_hidden(uri, matched, [f for f in listing if f not in taken], listing)


def _named_literally(uri: str) -> bool:
    """A path whose only pattern character is '[' and that exists as written ('runs[2]/t.jsonl',
    a folder named by a tool with brackets): taken as the file or folder it names, as a shell
    does, rather than as a character class that matches nothing."""
    if any(ch in uri for ch in "*?"):
        return False
    if not is_s3(uri):
        return os.path.exists(uri)
    return _names_a_file(uri) or bool(list_files(uri))


def _names_a_file(uri: str) -> bool:
    """Whether `uri` is one file (on S3 an object, not a folder marker) rather than a folder."""
    if is_s3(uri):
        return not _folder_marker(uri) and exists(uri)
    return os.path.isfile(uri)


def _without_hidden(base: str, matched: list[str], others: list[str], sizes: dict[str, int]) -> Expansion:
    """What a listing of the folder `base` names, less the files below a name (a folder's or the
    file's own) starting with '.' or '_': hidden, or bookkeeping — Jupyter's .ipynb_checkpoints
    copies, Spark's _temporary attempts and _SUCCESS, checksum files — as Hadoop and Spark skip
    them. Read as data they would train on stale copies or a failed job's partial output."""
    hidden = [f for f in matched if _hidden_below(base, f)]
    skip = set(hidden)
    return Expansion(
        [f for f in matched if f not in skip],
        [f for f in others if not _hidden_below(base, f)],
        [],
        hidden,
        {f: sizes[f] for f in matched if f not in skip},
    )


def _hidden_below(base: str, path: str) -> bool:
    if is_s3(base):
        rel = path[len(base.rstrip("/")) + 1 :]
    else:
        rel = os.path.relpath(path, base) if base else path
    return any(part.startswith((".", "_")) for part in rel.split("/") if part not in ("", ".", ".."))


# -- writing ------------------------------------------------------------------------------------


def write_bytes(uri: str, data: bytes, options: S3WriteOptions = DEFAULT_WRITE) -> None:
    """Write atomically: readers see the old object or the whole new one, never a part."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with s3_errors(uri):
            options.client().put_object(Bucket=bucket, Key=key, Body=data, **options.extra_args())
        return
    path = Path(uri)
    with _written_beside(path, data) as tmp:
        os.replace(tmp, path)


@contextlib.contextmanager
def _written_beside(path: Path, data: bytes) -> Iterator[str]:
    """A temporary file in `path`'s directory holding all of `data`, synced to disk, for the caller to
    move or link to `path`; removed on the way out if it is still there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def create_exclusive(uri: str, data: bytes, options: S3WriteOptions = DEFAULT_WRITE) -> bool:
    """Create the object only if it does not exist. True if this call created it.

    On S3 a conditional PUT (If-None-Match: *); locally the data goes to a temporary file that is then
    hard-linked to the name, which fails when the name exists. Either way two writers racing for the
    same key get exactly one winner, and a reader never sees the object before all of its bytes (an
    O_EXCL create followed by a write would show it empty in between). On S3 a PUT of this call's
    that the client retried after it had succeeded still counts as this call's (see
    `_create_exclusive_s3`); identical bytes from another writer do not.
    """
    if is_s3(uri):
        return _create_exclusive_s3(uri, data, options)
    path = Path(uri)
    try:
        with _written_beside(path, data) as tmp:
            os.chmod(tmp, 0o644)
            os.link(tmp, path)
    except FileExistsError:
        return False
    return True


# User metadata naming the `create_exclusive` call that put an object (a random token per call).
_WRITER = "fulltune-writer"
_CONDITION_FAILED = ("PreconditionFailed", "ConditionalRequestConflict", "412")


def _create_exclusive_s3(uri: str, data: bytes, options: S3WriteOptions) -> bool:
    """The conditional PUT, tagged with a token of this call's own.

    The client retries a PUT whose answer was lost (a timeout, a dropped connection). When the lost
    answer was a success the retry is refused, 412, although the object is this call's: refused,
    the object is read back, and it is this call's when it holds these bytes and this call's token.
    Another writer never has the token, so identical bytes put by it are still its win, not ours.
    """
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    token = uuid.uuid4().hex
    try:
        with s3_errors(uri):
            options.client().put_object(
                Bucket=bucket,
                Key=key,
                Body=data,
                IfNoneMatch="*",
                Metadata={_WRITER: token},
                **options.extra_args(),
            )
        return True
    except ClientError as exc:
        if _code(exc) not in _CONDITION_FAILED:
            raise StorageError(f"{uri}: {exc}") from exc
    return _put_by(uri, token, data)


def _put_by(uri: str, token: str, data: bytes) -> bool:
    """Whether the object at `uri` holds `data` and was put with `token`."""
    bucket, key = split_s3(uri)
    try:
        with s3_object(uri):
            answer = s3_client().get_object(Bucket=bucket, Key=key)
    except FileNotFoundError:
        return False  # another writer's conflicting PUT, not complete yet
    with contextlib.closing(answer["Body"]) as body:
        same = body.read() == data
    return same and answer.get("Metadata", {}).get(_WRITER) == token


def upload_file(local_path: str | Path, uri: str, options: S3WriteOptions = DEFAULT_WRITE) -> None:
    """Copy a local file to `uri`; large files go to S3 as a multipart upload."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with s3_errors(uri):
            options.client().upload_file(str(local_path), bucket, key, ExtraArgs=options.extra_args() or None)
        return
    _copy_whole(local_path, Path(uri))


def _copy_whole(src: str | Path, dest: Path) -> None:
    """Copy to `dest` through a temporary name beside it: `dest` appears whole or not at all, and a
    copy that fails (a full disk) leaves nothing behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def copy_object(src: str, dst: str, options: S3WriteOptions = DEFAULT_WRITE) -> None:
    """One S3 object to another, copied server-side (multipart for large objects)."""
    src_bucket, src_key = split_s3(src)
    dst_bucket, dst_key = split_s3(dst)
    with s3_errors(dst):
        options.client().copy(
            {"Bucket": src_bucket, "Key": src_key},
            dst_bucket,
            dst_key,
            ExtraArgs=options.extra_args() or None,
        )


def download_file(uri: str, local_path: str | Path) -> None:
    Path(local_path).parent.mkdir(parents=True, exist_ok=True)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with s3_errors(uri):
            s3_client().download_file(bucket, key, str(local_path))
    else:
        _copy_whole(uri, Path(local_path))


def upload_dir(local_dir: str | Path, uri: str) -> list[str]:
    """Copy every file of `local_dir` under `uri`; returns the relative paths copied."""
    local_dir = Path(local_dir)
    rels = sorted(str(p.relative_to(local_dir)) for p in local_dir.rglob("*") if p.is_file())
    for rel in rels:
        upload_file(local_dir / rel, join(uri, rel))
    return rels


@contextlib.contextmanager
def local_file(uri: str, suffix: str = "") -> Iterator[str]:
    """A local path holding the object: the path itself, or a temporary download on disk (not in
    memory), for readers that need random access (Parquet footers, Arrow files)."""
    if not is_s3(uri):
        yield uri
        return
    with tempfile.NamedTemporaryFile(prefix="fulltune-", suffix=suffix) as tmp:
        download_file(uri, tmp.name)
        yield tmp.name


@contextlib.contextmanager
def local_dir(uri: str) -> Iterator[Path]:
    """A local directory holding the tree at `uri`: the path itself, or a temporary download."""
    if not is_s3(uri):
        if not os.path.isdir(uri):
            raise FileNotFoundError(f"{uri}: no such directory")
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="fulltune-") as tmp:
        prefix = uri.rstrip("/") + "/"
        files = list_files(uri)
        if not files:
            raise FileNotFoundError(f"{uri}: no objects under this prefix")
        for f in files:
            download_file(f, Path(tmp, f[len(prefix) :]))
        yield Path(tmp)


def remove(uri: str) -> None:
    """Delete one file; nothing to do when it is not there."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with s3_errors(uri):
            s3_client().delete_object(Bucket=bucket, Key=key)  # a missing key is no error on S3
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(uri)


def remove_tree(uri: str) -> None:
    if is_s3(uri):
        bucket, _ = split_s3(uri)
        for f in list_files(uri):
            s3_client().delete_object(Bucket=bucket, Key=split_s3(f)[1])
    else:
        shutil.rmtree(uri, ignore_errors=True)


def size(uri: str) -> int:
    """The object's size in bytes."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with s3_object(uri):
            return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    return os.path.getsize(uri)


# -- checksums ----------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_uri(uri: str) -> str:
    h = hashlib.sha256()
    with open_read(uri) as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_manifest(root: str | Path, rels: list[str] | None = None) -> list[dict[str, Any]]:
    """[{path, size, sha256}] for the files of a local directory, sorted by path."""
    root = Path(root)
    if rels is None:
        rels = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return [
        {"path": rel, "size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
        for rel in sorted(rels)
    ]
